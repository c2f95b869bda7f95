"""
### NeRSemble capture -> Gaussian Head Avatar

Trigger with the capture id, e.g. `{"id": "018"}` (the form checks it). Six tasks, each one
`headavatar run <stage> --capture <id>`: extract -> sample -> matting -> fitting -> meshhead ->
gaussianhead. A failed task is retried with exponential backoff; a task whose stage another run
of the capture is computing waits for it (up for reschedule, no retry used) and then takes its
result. To redo from a stage, clear that task with its downstream tasks. Finished stages whose
inputs and config are unchanged are cache hits, and training resumes from its last checkpoint.

Each attempt has a time limit (`orchestration.<stage>_timeout_h`), the run one too
(`orchestration.dagrun_timeout_h`); a task that fails for good mails the `headavatar_alerts`
connection's recipients (capture, stage, try, log link). Priority is depth-first: a capture's later
stages go before other captures' earlier ones, so started captures finish first. The last stage
updates the `headavatar_avatar` Asset, which schedules `headavatar_compare`.
"""

from datetime import timedelta

from airflow.sdk import DAG, Param, chain

from headavatar_airflow.assets import AVATAR
from headavatar_airflow.notify import StageFailureNotifier
from headavatar_airflow.operators import stage_operator
from headavatar_airflow.pipeline import PARAM_DEFAULTS, STAGES, param_schema
from headavatar_airflow.stage_limits import dagrun_timeout

with DAG(
    dag_id="headavatar_capture",
    description="NeRSemble capture -> Gaussian Head Avatar (six stages)",
    schedule=None,
    params={name: Param(PARAM_DEFAULTS[name], **schema) if name in PARAM_DEFAULTS else Param(**schema)
            for name, schema in param_schema().items()},
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "weight_rule": "upstream",  # depth-first: priority grows along the chain
        "on_failure_callback": StageFailureNotifier(),
    },
    dagrun_timeout=dagrun_timeout(),
    max_active_runs=8,
    tags=["headavatar"],
    doc_md=__doc__,
):
    chain(*(stage_operator(stage, outlets=[AVATAR] if stage is STAGES[-1] else []) for stage in STAGES))

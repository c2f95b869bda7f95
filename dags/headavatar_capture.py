"""
### NeRSemble capture -> Gaussian Head Avatar

Trigger with the capture id, e.g. `{"id": "018"}` (the form checks it). Six tasks, each one
`headavatar run <stage> --capture <id>`: extract -> sample -> matting -> fitting -> meshhead ->
gaussianhead. A failed task is retried with exponential backoff; to redo from a stage, clear
that task with its downstream tasks. Finished stages whose inputs and config are unchanged are
cache hits, and training resumes from its last checkpoint.
"""

from datetime import timedelta

from airflow.sdk import DAG, Param, chain

from headavatar_airflow.operators import stage_operator
from headavatar_airflow.pipeline import PARAM_DEFAULTS, STAGES, param_schema

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
    },
    max_active_runs=8,
    tags=["headavatar"],
    doc_md=__doc__,
):
    chain(*(stage_operator(stage) for stage in STAGES))

"""
### Scheduled ingestion

Every 15 minutes (`HEADAVATAR_INGEST_SCHEDULE`), unpacks new `.zip` deliveries under `raw/` (task
`unpack`, on the stages' backend: a container of the preprocess image under `docker`; an archive that
cannot be unpacked fails that task once, without a retry, and is set aside under `raw/_rejected/` with
a `.reason.txt` beside it, so the next run is green; an object store that does not answer is retried),
then lists the complete captures under `raw/` (every camera there and the upload finished: its
`_COMPLETE` marker, or `ingest.quiet_minutes` without a change; docs/data.md) that have no finished
avatar of their raw inputs as they are now, and triggers `headavatar_capture` once per capture (run
id `ingest__<id>__<raw digest>`, a new one when the raw inputs changed, e.g. a sequence uploaded
later; an existing run of that id is left alone, so a failed capture is not retried forever: clear
or re-trigger it by hand). Each mapped trigger task is labelled by its capture id. The task logs say
why: each archive unpacked, skipped or set aside, and each capture found, complete or not (what it
lacks), pending or not (why). Each run is triggered with `HEADAVATAR_INGEST_PARAMS` (a JSON object of
the trigger form's fields, e.g. `{"profile": "demo"}`; unset: the defaults) besides its id; a wrong
value fails `find_pending_captures` with one line naming it. A task that fails for good is mailed
through the `headavatar_alerts` connection, as the stages are.
"""

import os
from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG

from headavatar_airflow.ingest import find_pending_captures, unpack_operator
from headavatar_airflow.notify import StageFailureNotifier

SUBJECT = "[headavatar] ingestion: {{ ti.task_id }} failed (try {{ ti.try_number }})"
BODY = """Task:     {{ ti.task_id }}, try {{ ti.try_number }} of {{ ti.max_tries + 1 }}
DAG run:  {{ ti.dag_id }} / {{ run_id }}
Error:    {{ exception }}
Log:      {{ ti.log_url }}

A broken archive is set aside under raw/_rejected/ with the reason beside it and not reported again;
upload a fixed one under its old name to ingest it.
"""

with DAG(
    dag_id="headavatar_ingest",
    description="trigger headavatar_capture for new captures in the bucket",
    schedule=os.environ.get("HEADAVATAR_INGEST_SCHEDULE", "*/15 * * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["headavatar"],
    doc_md=__doc__,
    default_args={"on_failure_callback": StageFailureNotifier(subject=SUBJECT, body=BODY)},
) as dag:
    pending = find_pending_captures()
    unpack_operator() >> pending
    TriggerDagRunOperator.partial(
        task_id="trigger_capture_runs", trigger_dag_id="headavatar_capture", skip_when_already_exists=True,
        map_index_template="{{ task.conf['id'] }}",
    ).expand_kwargs(pending)

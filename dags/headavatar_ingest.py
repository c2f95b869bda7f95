"""
### Scheduled ingestion

Every 15 minutes (`HEADAVATAR_INGEST_SCHEDULE`), unpacks new `.zip` deliveries under `raw/` (task
`unpack`, on the stages' backend: a container of the preprocess image under `docker`; an archive that
cannot be unpacked fails that task), then lists the complete captures under `raw/` (every camera
there and the upload finished: its `_COMPLETE` marker, or `ingest.quiet_minutes` without a change;
docs/data.md) that have no finished avatar of their raw inputs as they are now, and triggers
`headavatar_capture` once per capture (run id `ingest__<id>__<raw digest>`, a new one when the raw
inputs changed, e.g. a sequence uploaded later; an existing run of that id is left alone, so a
failed capture is not retried forever: clear or re-trigger it by hand). Each mapped trigger task
is labelled by its capture id.
"""

import os
from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG

from headavatar_airflow.ingest import find_pending_captures, unpack_operator

with DAG(
    dag_id="headavatar_ingest",
    description="trigger headavatar_capture for new captures in the bucket",
    schedule=os.environ.get("HEADAVATAR_INGEST_SCHEDULE", "*/15 * * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["headavatar"],
    doc_md=__doc__,
):
    pending = find_pending_captures()
    unpack_operator() >> pending
    TriggerDagRunOperator.partial(
        task_id="trigger_capture_runs", trigger_dag_id="headavatar_capture", skip_when_already_exists=True,
        map_index_template="{{ task.conf['id'] }}",
    ).expand_kwargs(pending)

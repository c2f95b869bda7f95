"""The ingestion DAG's one computing task: ask the stage CLI which captures still need the pipeline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from airflow.sdk import task

from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.operators import s3_environment

log = logging.getLogger(__name__)


@task(retries=2)
def find_pending_captures() -> list[dict[str, Any]]:
    """Unpack new .zip deliveries, then one TriggerDagRunOperator argument set per complete capture
    without a finished run (needs the headavatar package). A broken archive is logged and leaves its
    capture incomplete; it does not hold back the others."""
    public, secret = s3_environment(ExecutionSettings().s3_conn_id)
    env = {**os.environ, **public, **secret}
    cli = [sys.executable, "-m", "headavatar.cli"]
    unpacked = subprocess.run([*cli, "unpack"], capture_output=True, text=True, env=env)
    for line in (unpacked.stdout + unpacked.stderr).strip().splitlines():
        log.info("%s", line)
    out = subprocess.run([*cli, "captures", "--pending"], check=True, capture_output=True, text=True, env=env).stdout
    captures = json.loads(out.strip().splitlines()[-1])
    return [{"conf": {"id": c}, "trigger_run_id": f"ingest__{c}"} for c in captures]

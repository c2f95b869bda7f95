"""The ingestion DAG's one computing task: ask the stage CLI which captures still need the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from airflow.sdk import task

from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.operators import s3_environment


@task(retries=2)
def find_pending_captures() -> list[dict[str, Any]]:
    """One TriggerDagRunOperator argument set per pending capture (needs the headavatar package)."""
    public, secret = s3_environment(ExecutionSettings().s3_conn_id)
    out = subprocess.run([sys.executable, "-m", "headavatar.cli", "captures", "--pending"], check=True,
                         capture_output=True, text=True, env={**os.environ, **public, **secret}).stdout
    captures = json.loads(out.strip().splitlines()[-1])
    return [{"conf": {"id": c}, "trigger_run_id": f"ingest__{c}"} for c in captures]

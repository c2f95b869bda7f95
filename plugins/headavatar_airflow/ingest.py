"""The ingestion DAG's tasks: unpack new deliveries (on the stages' backend), then list what is pending."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from airflow.sdk import BaseOperator, task

from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.operators import s3_environment, stage_operator
from headavatar_airflow.pipeline import StageSpec

log = logging.getLogger(__name__)

# `headavatar unpack` runs where the stages run (the preprocess image on docker/kubernetes), not in the
# worker: it reads and writes whole archives. Its exit code is the task's: an archive that cannot be
# unpacked fails the task (the pending list still runs, so complete captures are not held back).
UNPACK = StageSpec("unpack", gpu=False)


def unpack_operator(settings: ExecutionSettings | None = None, **kwargs: Any) -> BaseOperator:
    return stage_operator(UNPACK, settings, command=["unpack"], retries=2, **kwargs)


@task(retries=2, trigger_rule="all_done")
def find_pending_captures() -> list[dict[str, Any]]:
    """One TriggerDagRunOperator argument set per complete capture without a finished avatar of its raw
    inputs as they are now (a listing: the stage CLI in the worker, which needs the headavatar package).
    The run id ``ingest__<id>__<raw digest>`` is new when the raw inputs changed (a sequence uploaded
    later). Runs after ``unpack`` whatever its outcome: a broken archive leaves its capture
    incomplete but does not hold back the others."""
    public, secret = s3_environment(ExecutionSettings().s3_conn_id)
    env = {**os.environ, **public, **secret}
    cli = [sys.executable, "-m", "headavatar.cli"]
    out = subprocess.run([*cli, "captures", "--pending"], check=True, capture_output=True, text=True, env=env).stdout
    pending = json.loads(out.strip().splitlines()[-1])
    for p in pending:
        log.info("capture %s pending (%s): run %s", p["capture"], p["reason"], p["run_id"])
    return [{"conf": {"id": p["capture"]}, "trigger_run_id": p["run_id"]} for p in pending]

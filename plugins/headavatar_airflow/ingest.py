"""The ingestion DAG's tasks: unpack new deliveries (on the stages' backend), then list what is pending."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from typing import Any

import jsonschema
from airflow.sdk import BaseOperator, task
from airflow.sdk.exceptions import AirflowFailException

from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.operators import fail, s3_environment, stage_operator
from headavatar_airflow.pipeline import StageSpec, param_schema

log = logging.getLogger(__name__)

# `headavatar unpack` runs where the stages run (the preprocess image on docker/kubernetes), not in the
# worker: it reads and writes whole archives. Its exit code is the task's (``operators.fail``): a broken
# archive exits 2 and fails the task once, without a retry (the failure notifier mails it); the archive
# is set aside under raw/_rejected/ with its reason, so the next run is green. The object store not
# answering exits 75: the task is retried. The pending list runs whatever unpack did, so complete
# captures are not held back. The CLI's output (stdout and stderr) is the task's log.
UNPACK = StageSpec("unpack", gpu=False)

# The CLI's log lines: "<date> <time> LEVEL logger: message" (headavatar.cli.main's logging format).
CLI_LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")

# The run parameters every ingested capture gets besides its id: a JSON object of the trigger form's fields,
# e.g. {"profile": "preview", "gaussianhead_steps": 30000}. Unset or {}: the form's defaults (the default
# profile). Read where the ingestion task runs, so every host's workers carry the same value.
RUN_PARAMS_ENV = "HEADAVATAR_INGEST_PARAMS"


def unpack_operator(settings: ExecutionSettings | None = None, **kwargs: Any) -> BaseOperator:
    return stage_operator(UNPACK, (settings or ExecutionSettings()).for_ingestion(), command=["unpack"], retries=2,
                          **kwargs)


def relay(stderr: str) -> None:
    """The CLI's stderr into the task log, line by line, at each line's own level (``error: ...``, the
    CLI's one-line failure, as an error; anything else, a traceback for one, as it came)."""
    for line in stderr.splitlines():
        if not line.strip():
            continue
        m = CLI_LOG_LINE.match(line)
        level = (logging.getLevelName(m.group(1)) if m else
                 logging.ERROR if line.startswith("error: ") else
                 logging.WARNING if line.startswith("warning: ") else logging.INFO)
        log.log(level, "%s", line)


def ingest_run_params(raw: str | None = None) -> dict[str, Any]:
    """The parameters of ``$HEADAVATAR_INGEST_PARAMS`` (or ``raw``), checked against the trigger form's schema,
    so a wrong one fails the ingestion task with one line naming it instead of every run it would trigger."""
    raw = os.environ.get(RUN_PARAMS_ENV, "") if raw is None else raw
    if not raw.strip():
        return {}
    try:
        params = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{RUN_PARAMS_ENV} is not JSON ({e}): {raw!r}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{RUN_PARAMS_ENV} must be a JSON object of run parameters, not {raw!r}")
    schema = {k: v for k, v in param_schema().items() if k != "id"}  # the id is each capture's own
    for name, value in params.items():
        if name not in schema:
            raise ValueError(f"{RUN_PARAMS_ENV}: {name!r} is not a run parameter (one of {', '.join(schema)})")
        try:
            jsonschema.validate(value, schema[name])
        except jsonschema.ValidationError as e:
            raise ValueError(f"{RUN_PARAMS_ENV}: {name}: {e.message}") from None
    return params


@task(retries=2, trigger_rule="all_done")
def find_pending_captures() -> list[dict[str, Any]]:
    """One TriggerDagRunOperator argument set per complete capture without a finished avatar of its raw
    inputs as they are now (a listing: the stage CLI in the worker, which needs the headavatar package).
    The run id ``ingest__<id>__<raw digest>`` is new when the raw inputs changed (a sequence uploaded
    later). Runs after ``unpack`` whatever its outcome: a broken archive leaves its capture
    incomplete but does not hold back the others. The task log says, per capture found, why it is or
    is not pending (the CLI's stderr); a non-zero exit maps as a stage's does (75, S3 unavailable:
    retried; 2: failed for good). Each run gets ``$HEADAVATAR_INGEST_PARAMS`` besides its id."""
    try:
        run_params = ingest_run_params()
    except ValueError as e:
        raise AirflowFailException(str(e)) from None  # a setting to fix, not a fault a retry outlasts
    public, secret = s3_environment(ExecutionSettings().for_ingestion().s3_conn_id)
    env = {**os.environ, **public, **secret}
    args = ["captures", "--pending"]
    log.info("running: headavatar %s", " ".join(args))
    r = subprocess.run([sys.executable, "-m", "headavatar.cli", *args], capture_output=True, text=True, env=env)
    relay(r.stderr)
    if r.returncode != 0:
        last = next((line for line in reversed(r.stderr.splitlines()) if line.strip()), "")
        raise fail(" ".join(args), r.returncode, last)
    pending = json.loads(r.stdout.strip().splitlines()[-1])
    log.info("%d capture(s) pending%s", len(pending), "".join(f"; {p['capture']}: run {p['run_id']}"
                                                               for p in pending))
    return [{"conf": {**run_params, "id": p["capture"]}, "trigger_run_id": p["run_id"]} for p in pending]

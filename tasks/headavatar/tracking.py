"""MLflow tracking of finished stages: one parent run per pipeline run, one child run per stage.

Enabled by ``MLFLOW_TRACKING_URI``. The parent run is found by its tags (capture id +
``HEADAVATAR_RUN_ID``, the Airflow run id; ``manual`` outside Airflow), so every stage process of
one DAG run logs under the same parent. A stage is logged into ONE child run per parent: a retried
or cleared task that finishes again logs into the same child (tag ``headavatar.attempts`` counts
them) and a cache hit of an already logged manifest logs nothing new. What is logged comes from
the stage's manifest and outputs: config as params, metrics, loss curves by step, and the pictures
(``overlays/``, ``renders/``). Tracking never fails a stage: any error is one warning line.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from headavatar.contract.stage import StageResult
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
EXPERIMENT = "headavatar"
PICTURE_DIRS = ("overlays/", "renders/")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v)[:500] if not isinstance(v, str) else v[:500]
    return out


def track_stage(result: StageResult, store: ObjectStore) -> str | None:
    """Log a finished stage; returns the child run id, or None when tracking is off or failed."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    # Fail fast when the server is down instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        return _track(uri, result, store)
    except Exception as e:  # tracking must never fail a stage or lose its outputs
        log.warning("MLflow tracking at %s failed (%s: %s); the stage's outputs are unaffected",
                    uri, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


def _parent(client: Any, experiment_id: str, capture: str, run_key: str) -> str:
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`headavatar.capture` = '{capture}' "
        f"and tags.`headavatar.run_key` = '{run_key}'"), max_results=1)
    if runs:
        return runs[0].info.run_id
    tags = {"headavatar.kind": "pipeline", "headavatar.capture": capture, "headavatar.run_key": run_key,
            "mlflow.runName": f"{capture} {run_key}"}
    for env, tag in (("HEADAVATAR_DAG_ID", "airflow.dag_id"), ("HEADAVATAR_RUN_ID", "airflow.run_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return client.create_run(experiment_id, tags=tags).info.run_id


def _track(uri: str, result: StageResult, store: ObjectStore) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from headavatar import __version__

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(os.environ.get("HEADAVATAR_MLFLOW_EXPERIMENT", EXPERIMENT))
    experiment_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    m = result.manifest
    parent = _parent(client, experiment_id, result.capture, os.environ.get("HEADAVATAR_RUN_ID") or "manual")
    digest = m.content_digest
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'stage' and tags.`mlflow.parentRunId` = '{parent}' "
        f"and tags.`headavatar.stage` = '{result.stage}'"), max_results=1)
    if found and found[0].data.tags.get("headavatar.manifest") == digest:
        log.info("%s/%s: already tracked in MLflow run %s", result.capture, result.stage, found[0].info.run_id)
        return found[0].info.run_id
    if found:
        run_id = found[0].info.run_id
        attempts = int(found[0].data.tags.get("headavatar.attempts", "1")) + 1
    else:
        run_id = client.create_run(experiment_id, run_name=result.stage, tags={
            "mlflow.parentRunId": parent, "headavatar.kind": "stage", "headavatar.stage": result.stage,
            "headavatar.capture": result.capture}).info.run_id
        attempts = 1
    for key, value in {"headavatar.manifest": digest, "headavatar.attempts": str(attempts),
                       "headavatar.cached": str(result.cached), "headavatar.package_version": __version__,
                       "headavatar.config_digest": m.config_digest, "headavatar.manifest_uri": result.manifest_uri,
                       "airflow.try_number": os.environ.get("HEADAVATAR_TRY_NUMBER", "")}.items():
        client.set_tag(run_id, key, value)
    known = set(client.get_run(run_id).data.params)
    params = [Param(k, v) for k, v in flatten(m.config).items() if k not in known]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in {**m.metrics, "wall_time_s": m.wall_time_s}.items()
               if isinstance(v, (int, float))]
    metrics += _curves(store, result, now)
    for i in range(0, len(params), 90):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i : i + 90])
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    _pictures(client, run_id, store, result)
    client.set_terminated(run_id)
    if result.stage == "gaussianhead":
        client.set_terminated(parent)
    log.info("%s/%s: tracked in MLflow run %s (parent %s)", result.capture, result.stage, run_id, parent)
    return run_id


def _curves(store: ObjectStore, result: StageResult, now: int) -> list:
    from mlflow.entities import Metric

    if "history.json" not in result.manifest.files:
        return []
    history = json.loads(store.get_bytes(store.key(stage_prefix(result.capture, result.stage), "history.json")))
    out = []
    for series, prefix in (("losses", "train/"), ("holdout", "")):
        for row in history.get(series, []):
            out += [Metric(f"{prefix}{k}", float(v), now, int(row["step"])) for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))]
    return out


def _pictures(client: Any, run_id: str, store: ObjectStore, result: StageResult) -> None:
    prefix = store.key(stage_prefix(result.capture, result.stage))
    names = sorted(f for f in result.manifest.files if f.startswith(PICTURE_DIRS) and f.endswith(".jpg"))
    with tempfile.TemporaryDirectory(prefix="headavatar-mlflow-") as tmp:
        for rel in names:
            path = Path(tmp) / rel
            store.download_file(f"{prefix}/{rel}", path)
            client.log_artifact(run_id, str(path), artifact_path=f"pictures/{Path(rel).parent}")

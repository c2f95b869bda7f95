"""MLflow tracking of finished stages: one parent run per pipeline run, one child run per stage.

Enabled by ``MLFLOW_TRACKING_URI``. The parent run is found by its tags (capture id +
``HEADAVATAR_RUN_ID``, the Airflow run id; ``manual`` outside Airflow), so every stage process of
one DAG run logs under the same parent. A stage is logged into ONE child run per parent: a retried
or cleared task that finishes again logs into the same child (tag ``headavatar.attempts`` counts
them) and a cache hit of an already logged manifest logs nothing new. What is logged comes from
the stage's manifest and outputs: config as params, metrics, loss and CPU/GPU usage curves by step,
the pictures (``overlays/``, ``renders/``) and the published checkpoints (tags holding their S3
URIs). Stage 6's avatar is logged as artifacts and registered as a new version of the model
``headavatar-<capture>`` (experiment and model prefix: $HEADAVATAR_MLFLOW_EXPERIMENT,
$HEADAVATAR_MLFLOW_MODEL_PREFIX). The ``headavatar.manifest`` tag is set last, so a tracking attempt cut
short is redone by the next one. Tracking never fails a stage: any error is one warning line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from headavatar.contract import variants
from headavatar.contract.stage import StageResult
from headavatar.layout import stage_prefix
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
EXPERIMENT_ENV, MODEL_PREFIX_ENV = "HEADAVATAR_MLFLOW_EXPERIMENT", "HEADAVATAR_MLFLOW_MODEL_PREFIX"
PICTURE_DIRS = ("overlays/", "renders/")
AVATAR_DIR = "avatar/"
CHECKPOINT_DIR = "checkpoints/"


@dataclass(frozen=True)
class TrackedRun:
    experiment_id: str
    run_id: str
    model_version: str | None = None


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or "headavatar"


# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, an assistant panel); the
# pipeline's runs are model training: its runs table, charts and compare view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def pipeline_experiment(client: Any) -> str:
    """The pipeline's experiment id, created (as model development, :data:`EXPERIMENT_KIND`) on first use."""
    exp = client.get_experiment_by_name(experiment_name())
    if exp is None:
        return str(client.create_experiment(experiment_name(), tags=EXPERIMENT_KIND))
    if exp.tags.get("mlflow.experimentKind") is None:  # created by an older release, or by hand
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return str(exp.experiment_id)


def model_name(capture: str) -> str:
    """One registered model per capture id: ``headavatar-<id>`` unless the deployment sets another prefix."""
    return f"{os.environ.get(MODEL_PREFIX_ENV) or 'headavatar-'}{capture}"


@cache
def code_version() -> str:
    """The git commit the code came from: baked into images as HEADAVATAR_GIT_COMMIT, else a checkout's HEAD."""
    if os.environ.get("HEADAVATAR_GIT_COMMIT"):
        return os.environ["HEADAVATAR_GIT_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def pipeline_digest(config: PipelineConfig) -> str:
    """Digest of everything but storage (which says where, not what)."""
    body = config.model_dump(mode="json", exclude={"storage"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v)[:500] if not isinstance(v, str) else v[:500]
    return out


def track_stage(result: StageResult, store: ObjectStore, config: PipelineConfig) -> TrackedRun | None:
    """Log a finished stage; returns its child run, or None when tracking is off or failed."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    # Fail fast when the server is down instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        return _track(uri, result, store, config)
    except Exception as e:  # tracking must never fail a stage or lose its outputs
        log.warning("MLflow tracking at %s failed (%s: %s); the stage's outputs are unaffected",
                    uri, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


def _parent(client: Any, experiment_id: str, capture: str, run_key: str, config: PipelineConfig) -> str:
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`headavatar.capture` = '{capture}' "
        f"and tags.`headavatar.run_key` = '{run_key}'"), max_results=1)
    if runs:
        return runs[0].info.run_id
    from headavatar import __version__

    tags = {"headavatar.kind": "pipeline", "headavatar.capture": capture, "headavatar.run_key": run_key,
            "mlflow.runName": f"{capture} {run_key}", "headavatar.package_version": __version__,
            "mlflow.source.git.commit": code_version(), "headavatar.config_digest": pipeline_digest(config)}
    for env, tag in (("HEADAVATAR_DAG_ID", "airflow.dag_id"), ("HEADAVATAR_RUN_ID", "airflow.run_id"),
                     ("HEADAVATAR_TRY_NUMBER", "airflow.try_number")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return client.create_run(experiment_id, tags=tags).info.run_id


def _track(uri: str, result: StageResult, store: ObjectStore, config: PipelineConfig) -> TrackedRun:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from headavatar import __version__

    client = MlflowClient(uri)
    experiment_id = pipeline_experiment(client)
    m = result.manifest
    parent = _parent(client, experiment_id, result.capture, os.environ.get("HEADAVATAR_RUN_ID") or "manual", config)
    digest = m.content_digest
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'stage' and tags.`mlflow.parentRunId` = '{parent}' "
        f"and tags.`headavatar.stage` = '{result.stage}'"), max_results=1)
    if found and found[0].data.tags.get("headavatar.manifest") == digest:
        log.info("%s/%s: already tracked in MLflow run %s", result.capture, result.stage, found[0].info.run_id)
        return TrackedRun(experiment_id, found[0].info.run_id, found[0].data.tags.get("headavatar.model_version"))
    if found:
        run_id = found[0].info.run_id
        attempts = int(found[0].data.tags.get("headavatar.attempts", "1")) + 1
    else:
        run_id = client.create_run(experiment_id, run_name=result.stage, tags={
            "mlflow.parentRunId": parent, "headavatar.kind": "stage", "headavatar.stage": result.stage,
            "headavatar.capture": result.capture}).info.run_id
        attempts = 1
    tags = [RunTag(k, v) for k, v in {
        "headavatar.attempts": str(attempts), "headavatar.cached": str(result.cached),
        "headavatar.package_version": __version__, "headavatar.config_digest": m.config_digest,
        "headavatar.manifest_uri": result.manifest_uri,
        # where its files are once another result is live: _variants/<this>/ (docs/caching.md)
        "headavatar.variant": variants.key_of(m)[:variants.KEY_CHARS],
        "airflow.try_number": os.environ.get("HEADAVATAR_TRY_NUMBER", ""), **_checkpoint_tags(store, result)}.items()]
    known = set(found[0].data.params) if found else set()  # a param once logged cannot change
    params = [Param(k, v) for k, v in flatten(m.config).items() if k not in known]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in {**m.metrics, "wall_time_s": m.wall_time_s}.items()
               if isinstance(v, (int, float))]
    metrics += _curves(store, result, now)
    # As few requests as MLflow's batch limits allow (100 params, 100 tags, 1000 entities in all): each one
    # costs a round trip to a tracking server that may be busy or far away.
    for i in range(max(-(-len(params) // 90), -(-len(metrics) // 800), 1)):
        client.log_batch(run_id, params=params[90 * i : 90 * (i + 1)], metrics=metrics[800 * i : 800 * (i + 1)],
                         tags=tags if i == 0 else [])
    # The parent run carries the headline figures, so MLflow's own compare view works on pipeline runs:
    # each stage's wall time, and the avatar's held-out metrics under their own names.
    headline = {f"{result.stage}_wall_time_s": m.wall_time_s}
    if result.stage == "gaussianhead":
        headline.update(m.metrics)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in headline.items()
                                      if isinstance(v, (int, float))])
    _pictures(client, run_id, store, result)
    _log_files(client, run_id, store, result, _media(result), "")
    version = _register_avatar(client, run_id, store, result) if result.stage == "gaussianhead" else None
    client.set_tag(run_id, "headavatar.manifest", digest)
    client.set_terminated(run_id)
    if result.stage == "gaussianhead":
        client.set_terminated(parent)
    log.info("%s/%s: tracked in MLflow run %s (parent %s)", result.capture, result.stage, run_id, parent)
    return TrackedRun(experiment_id, run_id, version)


def _curves(store: ObjectStore, result: StageResult, now: int) -> list:
    from mlflow.entities import Metric

    if "history.json" not in result.manifest.files:
        return []
    history = json.loads(store.get_bytes(store.key(stage_prefix(result.capture, result.stage), "history.json")))
    out = []
    for series, prefix in (("losses", "train/"), ("holdout", ""), ("system", "system/")):
        for row in history.get(series, []):
            out += [Metric(f"{prefix}{k}", float(v), now, int(row["step"])) for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))]
    return out


def _checkpoint_tags(store: ObjectStore, result: StageResult) -> dict[str, str]:
    """Published checkpoints are referenced, not copied: they can be large and already live in S3."""
    prefix = stage_prefix(result.capture, result.stage)
    return {f"headavatar.checkpoint.{Path(f).stem}": store.uri(store.key(prefix, f))
            for f in result.manifest.files if f.startswith(CHECKPOINT_DIR)}


def _log_files(client: Any, run_id: str, store: ObjectStore, result: StageResult, names: list[str],
               artifact_dir: str) -> None:
    prefix = store.key(stage_prefix(result.capture, result.stage))
    with tempfile.TemporaryDirectory(prefix="headavatar-mlflow-") as tmp:
        for rel in names:
            path = Path(tmp) / rel
            store.download_file(f"{prefix}/{rel}", path)
            parent = str(Path(rel).parent)
            client.log_artifact(run_id, str(path), artifact_path=f"{artifact_dir}/{parent}" if artifact_dir
                                else parent)


def _pictures(client: Any, run_id: str, store: ObjectStore, result: StageResult) -> None:
    names = sorted(f for f in result.manifest.files if f.startswith(PICTURE_DIRS) and f.endswith(".jpg"))
    _log_files(client, run_id, store, result, names, "pictures")


def _media(result: StageResult) -> list[str]:
    """Stage 6's avatar videos (``videos/*.mp4``) and animated page (``viewer/*.html``), logged as run
    artifacts and linked from the model version."""
    files = result.manifest.files
    return sorted([f for f in files if f.startswith("videos/") and f.endswith(".mp4")]
                  + [f for f in files if f.startswith("viewer/") and f.endswith(".html")])


def _register_avatar(client: Any, run_id: str, store: ObjectStore, result: StageResult) -> str | None:
    """A new version of ``headavatar-<capture>`` per trained avatar (one per child run and manifest)."""
    from mlflow.exceptions import MlflowException

    names = sorted(f for f in result.manifest.files if f.startswith(AVATAR_DIR))
    if not names:
        return None
    name, digest = model_name(result.capture), result.manifest.content_digest
    try:
        client.create_registered_model(name, tags={"headavatar.capture": result.capture},
                                       description=f"Gaussian head avatars of capture {result.capture}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("headavatar.manifest") == digest:  # this very avatar (a cache hit, or a cut-short attempt)
            client.set_tag(run_id, "headavatar.model_version", mv.version)
            crown_champion(client, name)
            return mv.version
    _log_files(client, run_id, store, result, names, "")
    metrics = {k: str(v) for k, v in result.manifest.metrics.items()
               if k.startswith(("holdout_", "novel_view_", "self_reenactment_"))}
    artifacts = client.get_run(run_id).info.artifact_uri
    videos = {f"headavatar.{'video' if f.endswith('.mp4') else 'viewer'}.{Path(f).stem}": f"{artifacts}/{f}"
              for f in _media(result)}
    mv = client.create_model_version(name, source=f"{artifacts}/avatar",
                                     run_id=run_id, tags={"headavatar.manifest": digest, **metrics, **videos},
                                     description=f"avatar of {result.capture}, manifest {digest[:12]}")
    client.set_tag(run_id, "headavatar.model_version", mv.version)
    log.info("%s/gaussianhead: registered as model %s version %s", result.capture, name, mv.version)
    crown_champion(client, name)
    return mv.version


CHAMPION = "champion"


def crown_champion(client: Any, name: str) -> str | None:
    """Point the alias ``champion`` of registered model ``name`` at its version with the best held-out PSNR
    (the newest among equals): the newest avatar of a capture need not be its best. Returns that version."""
    scored = [(float(mv.tags["holdout_psnr"]), int(mv.version)) for mv in client.search_model_versions(
        f"name = '{name}'") if "holdout_psnr" in mv.tags]
    if not scored:
        return None
    best = str(max(scored)[1])
    client.set_registered_model_alias(name, CHAMPION, best)
    log.info("model %s: %s is version %s (held-out PSNR %.2f dB)", name, CHAMPION, best, max(scored)[0])
    return best

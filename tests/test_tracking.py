"""MLflow tracking against a real ``mlflow server``: one parent run per pipeline run, a child per stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import free_port
from headavatar.storage import ObjectStore


def runs(client: MlflowClient, **tags: str) -> list:
    exp = client.get_experiment_by_name("headavatar")
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp.experiment_id], filter_string=flt) if exp else []


@pytest.mark.s3
@pytest.mark.slow
def test_stages_log_into_one_parent_run_without_duplicates(store: ObjectStore, tiny_capture: Path,
                                                          s3_env: dict[str, str], mlflow_server: str) -> None:
    upload_capture(store, tiny_capture)
    run_key = f"run-{s3_env['HEADAVATAR_S3_PREFIX']}"
    env = {**s3_env, "MLFLOW_TRACKING_URI": mlflow_server, "HEADAVATAR_RUN_ID": run_key}
    for stage in ("extract", "sample", "matting"):
        r = cli("run", stage, "--capture", "018", "--profile", "demo", env=env)
        assert r.returncode == 0 and "tracked in MLflow run" in r.stderr, r.stderr[-2000:]
    again = cli("run", "sample", "--capture", "018", "--profile", "demo", env=env)  # cache hit: nothing new
    assert "already tracked" in again.stderr
    same = cli("run", "sample", "--capture", "018", "--profile", "demo", "--force", env=env)
    assert "already tracked" in same.stderr  # recomputed byte for byte: the same manifest content
    # A cleared task that finishes with other outputs logs into the same child run.
    redo = cli("run", "sample", "--capture", "018", "--profile", "demo", "--set", "sample.frame_stride=4", env=env)
    assert redo.returncode == 0 and "tracked in MLflow run" in redo.stderr

    client = MlflowClient(mlflow_server)
    parents = runs(client, **{"headavatar.kind": "pipeline", "headavatar.run_key": run_key})
    assert len(parents) == 1 and parents[0].data.tags["headavatar.capture"] == "018"
    children = runs(client, **{"mlflow.parentRunId": parents[0].info.run_id})
    by_stage = {c.data.tags["headavatar.stage"]: c for c in children}
    assert sorted(by_stage) == ["extract", "matting", "sample"] and len(children) == 3
    assert by_stage["sample"].data.tags["headavatar.attempts"] == "2"
    matting = by_stage["matting"].data
    assert matting.metrics["iou_mean"] == read_manifest(store, "018", "matting").metrics["iou_mean"] >= 0.9
    assert matting.params["matting.method"] == "classical" and by_stage["sample"].data.metrics["frames_kept"] == 4
    pictures = [a.path for a in client.list_artifacts(by_stage["matting"].info.run_id, "pictures/overlays")]
    assert pictures == ["pictures/overlays/0000.jpg"]
    local = client.download_artifacts(by_stage["matting"].info.run_id, "pictures/overlays/0000.jpg")
    assert Path(local).stat().st_size > 10_000


@pytest.mark.s3
def test_unreachable_tracking_server_never_fails_a_stage(store: ObjectStore, tiny_capture: Path,
                                                         s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    env = {**s3_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    r = cli("run", "extract", "--capture", "018", "--profile", "demo", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MLflow tracking at" in r.stderr and "the stage's outputs are unaffected" in r.stderr
    assert read_manifest(store, "018", "extract") is not None

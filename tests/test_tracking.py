"""MLflow tracking against a real ``mlflow server``: one parent run per pipeline run, a child per stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, copy_stages, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import free_port
from headavatar.storage import ObjectStore
from test_airflow import LOCAL_RUN


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
@pytest.mark.slow
def test_unreachable_tracking_server_never_fails_a_stage(store: ObjectStore, tiny_capture: Path,
                                                         s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    env = {**s3_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    r = cli("run", "extract", "--capture", "018", "--profile", "demo", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MLflow tracking at" in r.stderr and "the stage's outputs are unaffected" in r.stderr
    assert read_manifest(store, "018", "extract") is not None


TRAINING = ["--set", "meshhead.steps=20", "--set", "meshhead.eval_every=10", "--set", "meshhead.checkpoint_every=10",
            "--set", "meshhead.keep_checkpoint_every=10", "--set", "gaussianhead.steps=20"]


@pytest.mark.s3
@pytest.mark.slow
def test_training_runs_are_registered_once_each_and_compared(store: ObjectStore, tiny_capture: Path,
                                                            s3_env: dict[str, str], mlflow_server: str,
                                                            local_dag_runs: dict[str, str], tmp_path: Path) -> None:
    # Stages 1-4 as tests/test_airflow.py's local DAG run computed them (the same ci settings), else here.
    upstream = local_dag_runs.get(json.dumps(LOCAL_RUN))
    if upstream is not None:
        copy_stages(store, upstream, ("extract", "sample", "matting", "fitting"))
    else:
        upload_capture(store, tiny_capture)
    models = f"{s3_env['HEADAVATAR_S3_PREFIX']}-avatar-"
    env = {**s3_env, "MLFLOW_TRACKING_URI": mlflow_server, "HEADAVATAR_MLFLOW_MODEL_PREFIX": models}

    def run(stage: str, key: str, *extra: str) -> dict:
        r = cli("run", stage, "--capture", "018", "--profile", "ci", *TRAINING, *extra,
                env={**env, "HEADAVATAR_RUN_ID": key})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    if upstream is None:
        for stage in ("extract", "sample", "matting", "fitting"):
            run(stage, "first")
    run("meshhead", "first")
    first = run("gaussianhead", "first")
    assert first["mlflow"]["model_version"] == "1"
    again = run("gaussianhead", "second")  # another DAG run, a cache hit: the same avatar, no new version
    assert again["mlflow"]["run_id"] != first["mlflow"]["run_id"] and again["mlflow"]["model_version"] == "1"
    longer = run("gaussianhead", "third", "--set", "gaussianhead.steps=30")  # a new training run
    assert longer["mlflow"]["model_version"] == "2"

    client = MlflowClient(mlflow_server)
    versions = sorted(client.search_model_versions(f"name = '{models}018'"), key=lambda v: int(v.version))
    assert [(v.version, v.run_id) for v in versions] == [("1", first["mlflow"]["run_id"]),
                                                         ("2", longer["mlflow"]["run_id"])]
    local = Path(client.download_artifacts(first["mlflow"]["run_id"], "avatar"))
    assert sorted(p.name for p in local.iterdir()) == ["avatar.json", "avatar.pt"]
    assert json.loads((local / "avatar.json").read_text())["capture"] == "018"
    assert float(versions[1].tags["holdout_psnr"]) == read_manifest(store, "018", "gaussianhead").metrics[
        "holdout_psnr"]  # the manifest now holds the 30-step avatar
    videos = Path(client.download_artifacts(longer["mlflow"]["run_id"], "videos"))  # issue 22: linked videos
    assert sorted(p.name for p in videos.iterdir()) == ["reenactment.mp4", "turntable.mp4"]
    assert versions[1].tags["headavatar.video.turntable"].endswith("/videos/turntable.mp4")
    viewer = Path(client.download_artifacts(longer["mlflow"]["run_id"], "viewer"))  # the animated avatar page
    assert [p.name for p in viewer.iterdir()] == ["avatar.html"]
    assert "avatar-frames" in (viewer / "avatar.html").read_text()
    assert versions[1].tags["headavatar.viewer.avatar"].endswith("/viewer/avatar.html")
    assert "novel_view_psnr_matte" in versions[1].tags
    best = max(versions, key=lambda v: (float(v.tags["holdout_psnr"]), int(v.version)))
    assert client.get_model_version_by_alias(f"{models}018", "champion").version == best.version

    parent = client.get_run(client.get_run(first["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["headavatar.run_key"] == "first"
    assert len(parent.data.tags["headavatar.config_digest"]) == 16 and parent.data.tags["mlflow.source.git.commit"]
    mesh = runs(client, **{"mlflow.parentRunId": parent.info.run_id, "headavatar.stage": "meshhead"})[0]
    assert mesh.data.tags["headavatar.checkpoint.step-00000010"].endswith("/meshhead/checkpoints/step-00000010.pt")
    cpu = client.get_metric_history(mesh.info.run_id, "system/cpu_percent")
    assert [m.step for m in cpu] == [10, 20] and all(m.value > 0 for m in cpu)

    out = tmp_path / "report"
    r = cli("compare", "--capture", "018", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    ours = [line for line in lines[1:] if first["mlflow"]["run_id"] in line or longer["mlflow"]["run_id"] in line]
    assert lines[0].split()[:3] == ["capture", "run_name", "run_id"] and "holdout_psnr" in lines[0] and len(ours) == 2
    table = list(csv.DictReader((out / "compare.csv").open()))
    mine = {row["run_id"]: row for row in table}
    assert float(mine[longer["mlflow"]["run_id"]]["steps"]) == 30
    assert again["mlflow"]["run_id"] not in mine  # the cache hit is the same avatar: one row
    page = (out / "compare.html").read_text()
    assert page.count("<svg") >= 2 and first["mlflow"]["run_id"] in page
    assert "Matplotlib v" in page and "holdout_psnr (higher is better)" in page  # charts drawn by matplotlib
    # Per capture: its avatars, the setting in which they differ, their videos side by side (embedded).
    section = page[page.index("<h2>Capture 018: "):page.index("<h2>All avatars</h2>")]

    def row(version: str) -> str:
        start = section.index(f"<tr><td>018 v{version}</td>")
        return section[start:section.index("</tr>", start)]

    assert "gaussianhead.steps = 20" in row("1") and "gaussianhead.steps = 30" in row("2")
    assert section.count("<video") >= 4 and section.count("src='data:video/mp4;base64,") == section.count("<video")
    assert sorted(p.name for p in (out / "videos" / longer["mlflow"]["run_id"]).iterdir()) == [
        "reenactment.mp4", "turntable.mp4"]
    logged = cli("compare", "--capture", "018", "--mlflow", env={**env, "HEADAVATAR_MLFLOW_UI_URL": "http://ui.example"})
    assert logged.returncode == 0, logged.stderr[-2000:]
    report_id = logged.stderr.strip().splitlines()[-1].split()[-1]
    # The videos are in the page (embedded), so none is logged a second time beside it.
    assert sorted(a.path for a in client.list_artifacts(report_id)) == ["compare.csv", "compare.html", "compare.txt"]
    for v in client.search_model_versions(f"name = '{models}018'"):  # every version links to the report
        assert v.tags["headavatar.compare_report"] == (
            f"http://ui.example/#/experiments/{client.get_run(report_id).info.experiment_id}/runs/{report_id}"
            "/artifacts/compare.html")
    missing = cli("compare", "--capture", "999", env=env)
    assert missing.returncode == 2 and "no tracked gaussianhead run for 999" in missing.stderr

    # Back to 20 steps: the first avatar was kept in the bucket as a variant and comes back uncomputed,
    # the same avatar (model version 1); status lists the 30-step one now kept in its place.
    back = run("gaussianhead", "fourth")
    assert back["cached"] and back["mlflow"]["model_version"] == "1"
    assert client.get_run(back["mlflow"]["run_id"]).data.tags["headavatar.variant"] == \
        client.get_run(first["mlflow"]["run_id"]).data.tags["headavatar.variant"]
    status = cli("status", "--capture", "018", "--profile", "ci", *TRAINING, env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    kept = lines[lines.index(next(x for x in lines if x.startswith("gaussianhead  done"))) + 1]
    assert "variant" in kept and "gaussianhead.steps=30" in kept and "psnr" in kept, status.stdout


def test_champion_is_the_best_held_out_avatar_not_the_newest(mlflow_server: str, s3_env: dict[str, str]) -> None:
    """Three avatars of one capture, the best in the middle: ``champion`` follows the held-out PSNR, also
    when a worse one is registered later; a version without a score never takes it."""
    from headavatar.tracking import crown_champion

    client = MlflowClient(mlflow_server)
    name = f"{s3_env['HEADAVATAR_S3_PREFIX']}-champion-018"
    client.create_registered_model(name)
    for psnr in ("24.6", "31.9", "28.0"):
        client.create_model_version(name, source="s3://headavatar/x/avatar", tags={"holdout_psnr": psnr})
    assert crown_champion(client, name) == "2"
    client.create_model_version(name, source="s3://headavatar/x/avatar", tags={"holdout_psnr": "30.1"})
    client.create_model_version(name, source="s3://headavatar/x/avatar")  # no held-out score
    assert crown_champion(client, name) == "2"
    assert client.get_model_version_by_alias(name, "champion").tags["holdout_psnr"] == "31.9"

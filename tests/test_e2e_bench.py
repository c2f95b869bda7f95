"""The GPU pipeline bench's bookkeeping, on the CPU: how attempts of a stage add up, what a stage stopped
at the deadline records, which file a run's results go to. The bench itself runs on a lent GPU
(docs/gpu.md); these are the parts whose mistakes would put wrong figures in a committed result."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import BUCKET, fake_manifest
from headavatar.bench.e2e_gpu import (
    CAPTURE,
    GSPLAT_PID,
    TEXTURE_MARKER,
    Deadline,
    GsplatPrebuild,
    TrackingServer,
    capture_texture,
    from_the_log,
    main,
    prebuild_gsplat,
    register,
    results_name,
    run_stage,
    so_far,
    summed,
    timeline,
    track,
    wait_gsplat,
)
from headavatar.contract.outputs import state_key
from headavatar.contract.stage import manifest_key, read_manifest
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore
from headavatar.training.checkpoints import RESUMABLE


def test_attempts_add_up_until_the_one_that_finished_the_stage() -> None:
    attempts = [{"state": "stopped at the deadline", "wall_s": 100.0, "peak_gpu_mib": 900},
                {"state": "running", "wall_s": 40.5, "peak_gpu_mib": 1200},  # cut short by a lost call
                {"state": "exit code 1", "wall_s": 3.0, "peak_gpu_mib": 5000},  # failed: listed, not counted
                {"state": "done", "wall_s": 60.0, "peak_gpu_mib": 1000},
                {"state": "done", "wall_s": 2.0, "peak_gpu_mib": 7000}]  # a later cache hit
    assert summed(attempts) == {"wall_s": 200.5, "attempts": 5, "peak_gpu_mib": 1200, "peak_host_mib": 0}
    assert summed([{"state": "running", "wall_s": 12.0}])["wall_s"] == 12.0  # not finished yet: all so far


def test_a_non_default_texture_gets_its_own_results_file() -> None:
    assert results_name(True, "ground_truth", "astronaut") == "e2e_real_size_gpu.json"
    assert results_name(True, "ground_truth", "procedural") == "e2e_real_size_procedural_gpu.json"
    assert results_name(False, "ground_truth", "procedural") == "e2e_gpu.json"
    assert results_name(False, "ground_truth", "astronaut") == "e2e_astronaut_gpu.json"
    assert results_name(False, "dlib", "astronaut") == "e2e_gpu_dlib.json"


def test_dlib_on_the_procedural_texture_is_refused_before_anything_runs(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--home", str(tmp_path), "--detector", "dlib", "--texture", "procedural"])
    assert e.value.code == 2 and "--texture astronaut" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.s3
def test_a_stage_stopped_at_the_deadline_records_its_checkpoint(store: ObjectStore) -> None:
    key = state_key(store.key(stage_prefix(CAPTURE, "gaussianhead")), RESUMABLE)
    assert so_far(store, "gaussianhead") == {"checkpoint_step": 0}
    evals = [{"step": 0, "psnr": 19.5}, {"step": 5000, "psnr": 41.4}]
    store.put_bytes(key, _saved({"step": 5000, "evals": evals, "timing": [114.0, 5000], "cache_key": "k"}))
    assert so_far(store, "gaussianhead") == {"checkpoint_step": 5000, "checkpoint_cache_key": "k",
                                             "holdout_curve": evals, "ms_per_step": 22.8}
    for bad in (b"half a checkpoint", _saved([1, 2]), _saved({"evals": evals})):  # corrupt, not a dict, no step
        store.put_bytes(key, bad)
        assert "refused to load" in so_far(store, "gaussianhead")["checkpoint_unreadable"]


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_home_keeps_the_texture_its_capture_was_made_with(tmp_path: Path) -> None:
    assert capture_texture(tmp_path, None, True, "ground_truth") == "astronaut"  # nothing made yet: the default
    (tmp_path / TEXTURE_MARKER).write_text("procedural")
    assert capture_texture(tmp_path, None, True, "ground_truth") == "procedural"  # a later call that omits it
    with pytest.raises(ValueError, match="holds a capture with the procedural texture"):
        capture_texture(tmp_path, "astronaut", True, "ground_truth")


FAKE_STAGE = """
import pathlib, sys, time
checkpoint = pathlib.Path(sys.argv[1])
print("x INFO headavatar.stages.meshhead: 090/meshhead: resuming from the checkpoint at step 500", flush=True)
for i in range(1, 1000):
    time.sleep(0.02)
    print(f"x INFO headavatar.training.loop: meshhead: step {500 + 10 * i}/10000 loss 0.1 (9 steps/s)", flush=True)
    if i % 150 == 0:  # every ~3 s
        checkpoint.write_text(str(500 + 10 * i))
"""


def test_past_the_deadline_a_training_stage_stops_at_its_next_checkpoint(tmp_path: Path) -> None:
    """The stage is stopped right after the first checkpoint written past the deadline (so the next call
    loses no steps), its output logged with timestamps, its progress lines and its latest checkpoint's
    state kept in the attempt."""
    checkpoint = tmp_path / "checkpoint"
    attempt: dict = {}
    t0 = time.monotonic()
    with pytest.raises(Deadline):
        run_stage({**os.environ}, "meshhead", [], attempt=attempt, deadline=t0 + 0.2, grace=30,
                  checkpoint=lambda: checkpoint.read_text() if checkpoint.exists() else None, log_dir=tmp_path,
                  command=[sys.executable, "-c", FAKE_STAGE, str(checkpoint)],
                  so_far=lambda: {"checkpoint_step": int(checkpoint.read_text())}, so_far_every=0.5)
    assert attempt["state"] == "stopped at the deadline" and attempt["wall_s"] < 20
    assert attempt["checkpoint"] == {"checkpoint_step": 2000}  # read as it came: kept if the machine is lost
    assert checkpoint.read_text() == "2000"  # the first one (step 2000, ~3 s in), not a later one
    assert attempt["resumed_from"] == 500
    steps = [s for _, s in attempt["progress"]]
    assert steps[0] == 510 and steps == sorted(steps) and 2000 <= steps[-1] < 3500
    lines = (tmp_path / "meshhead.log").read_text().splitlines()
    assert re.fullmatch(r"\[\s*\d+\.\d\d\] x INFO .*resuming from the checkpoint at step 500", lines[0])

    attempt = {}
    with pytest.raises(Deadline):  # no grace: stopped at the deadline, wherever it is
        run_stage({**os.environ}, "meshhead", [], attempt=attempt, deadline=time.monotonic() + 0.2,
                  checkpoint=lambda: "same", command=[sys.executable, "-c", FAKE_STAGE, str(tmp_path / "c2")])
    assert attempt["wall_s"] < 5 and attempt["progress"][-1][1] < 2000


def test_a_stage_that_ends_before_the_deadline_is_done(tmp_path: Path) -> None:
    attempt: dict = {}
    out = run_stage({**os.environ}, "sample", [], attempt=attempt, deadline=time.monotonic() + 60, log_dir=tmp_path,
                    command=[sys.executable, "-c", "print('sampled')"])
    assert attempt["state"] == "done" and out["wall_s"] < 30
    assert (tmp_path / "sample.log").read_text().endswith("] sampled\n")
    with pytest.raises(SystemExit, match="exit code 3"):
        run_stage({**os.environ}, "sample", [], command=[sys.executable, "-c", "raise SystemExit(3)"])


def test_the_timeline_of_a_training_stage_comes_from_its_progress_lines() -> None:
    first = {"progress": [[60.0, 1000], [80.0, 2000], [100.0, 3000], [120.0, 5000], [170.0, 10_000],
                          [175.0, 10_250], [230.0, 15_000], [250.0, 16_000]]}
    resumed = {"resumed_from": 16_000, "progress": [[40.0, 17_000], [60.0, 18_000], [100.0, 20_000],
                                                    [200.0, 25_000]]}
    log = from_the_log([first, resumed], 5000, (10_000, 15_000))
    # 1000 steps by the first line at 20 s a 1000: step 1 came 999 steps (19.98 s) before it
    assert log["stage_start_to_step_1_s"] == pytest.approx(40.02)
    assert log["attempt_start_to_first_step_s"] == [pytest.approx(40.02), pytest.approx(20.02)]
    assert log["stretches"] == [[5000, 10_000, 50.0, 10.0], [10_000, 15_000, 60.0, 12.0], [20_000, 25_000, 100.0, 20.0]]
    assert log["seconds_steps_10000_to_15000"] == 60.0 and log["ms_per_step_10000_to_15000"] == 12.0
    assert "ms_per_step_10000_to_15000" not in from_the_log([resumed], 5000, (10_000, 15_000))
    assert timeline("gaussianhead", [{**first, "gsplat_build_s": 61.4}])["gsplat_extension_build_s"] == 61.4
    assert timeline("gaussianhead", [first])["gsplat_extension_build_s"] == 0.0
    assert "gsplat_extension_build_s" not in timeline("meshhead", [first])


@pytest.mark.parametrize("builds", [True, False])
def test_gsplat_is_built_once_in_the_background_and_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               builds: bool) -> None:
    """A stand-in gsplat whose extension takes a moment to build (or fails): the builder runs in a session of
    its own, a second call of the same home starts none, and stage 6 waits for its result."""
    fake = tmp_path / "site"
    (fake / "gsplat" / "cuda").mkdir(parents=True)
    (fake / "gsplat" / "__init__.py").write_text("")
    (fake / "gsplat" / "cuda" / "__init__.py").write_text("")
    (fake / "gsplat" / "cuda" / "_backend.py").write_text(
        "import os, time\ntime.sleep(0.5)\nassert os.environ['CUDA_VISIBLE_DEVICES'] == ''\n"
        + ("_C = object()\n" if builds else "raise RuntimeError('nvcc failed')\n"))
    monkeypatch.syspath_prepend(str(fake))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(fake), "TORCH_CUDA_ARCH_LIST": "9.0+PTX"}
    proc = prebuild_gsplat(home, env, None)
    assert proc is not None and os.getsid(proc.pid) == proc.pid  # a session of its own: it outlives the call
    assert prebuild_gsplat(home, env, None) is None  # once per home
    done = wait_gsplat(home, proc)
    assert done["rc"] == (0 if builds else 1) and done["wall_s"] >= 0.5 and done["waited_s"] > 0
    assert builds or "nvcc failed" in done["error"]
    again = wait_gsplat(home, None)  # a later call: the result is there
    assert again["rc"] == done["rc"] and again["waited_s"] < 1
    assert wait_gsplat(tmp_path, None) is None  # none was started from this home
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert prebuild_gsplat(tmp_path, env, None) is None  # gsplat not installed


def test_gsplat_installed_by_a_later_call_is_built_when_it_comes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder a later call installs gsplat into is on sys.path before it exists; the watcher finds gsplat
    there once it is put in, and stage 6 waits for that build. Without it, stage 6 goes on after its wait."""
    site = tmp_path / "later"  # not made yet
    monkeypatch.syspath_prepend(str(site))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    watcher = GsplatPrebuild(home, env, None, period=0.2)
    time.sleep(0.5)
    assert not (home / GSPLAT_PID).exists()
    (site / "gsplat" / "cuda").mkdir(parents=True)
    for init in ("gsplat/__init__.py", "gsplat/cuda/__init__.py"):
        (site / init).write_text("")
    (site / "gsplat" / "cuda" / "_backend.py").write_text("_C = object()\n")
    done = watcher.result(install_wait=30)
    assert done is not None and done["rc"] == 0 and 0.3 < done["waited_s"] < 30

    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    t0 = time.monotonic()
    assert GsplatPrebuild(empty, env, None, period=0.2).result(install_wait=0.5) is None
    assert time.monotonic() - t0 < 5


STAND_IN = """
import json, logging, sys
from headavatar.contract.stage import StageResult, manifest_key, read_manifest
from headavatar.settings import load_config
from headavatar.storage import ObjectStore
from headavatar.tracking import track_stage
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
stage, config = sys.argv[1], load_config()
store = ObjectStore(config.storage)
logging.getLogger("headavatar.contract.stage").info("%s/%s: cache hit", sys.argv[2], stage)
result = StageResult(stage, sys.argv[2], True, read_manifest(store, sys.argv[2], stage),
                     store.uri(manifest_key(store, sys.argv[2], stage)))
tracked = track_stage(result, store, config)
print(json.dumps({"stage": stage, "cached": True, "mlflow": {"model_version": tracked.model_version}}))
"""


@pytest.mark.s3
def test_the_register_phase_registers_the_avatar_and_times_it(store: ObjectStore, s3_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    """A real ``mlflow server`` from the bench's register phase, stage 6 done (its manifest and avatar in the
    bucket) and a stand-in for its cache-hit ``headavatar run`` that tracks as the CLI does (track_stage): the
    stage is tracked and timed, its avatar becomes version 1 of ``headavatar-<capture>``, read back, and the
    server is stopped. (One stage: the server's start is most of the test's time.)"""
    fake_manifest(store, "gaussianhead", {"avatar/avatar.pt": b"weights", "avatar/avatar.json": b"{}"},
                  capture=CAPTURE)
    scored = replace(read_manifest(store, CAPTURE, "gaussianhead"), metrics={"holdout_psnr": 45.9})
    store.put_bytes(manifest_key(store, CAPTURE, "gaussianhead"), scored.to_json())
    server = TrackingServer(tmp_path / "home", {**os.environ}, BUCKET, None, period=0.2)
    started_at = time.time()
    stand_in = lambda stage: [sys.executable, "-c", STAND_IN, stage, CAPTURE]  # noqa: E731
    out: dict = {}  # tracked first as --track-during-stage6 does, then the phase skips it
    assert track(server, {**os.environ}, ["gaussianhead"], {}, [], tmp_path / "logs", out, wait=5,
                 command=stand_in, during="stage 6") == server.server.uri
    register(server, {**os.environ}, ["gaussianhead"], {}, [], tmp_path / "logs", started_at=started_at, out=out,
             command=stand_in)
    assert out["server"]["start_s"] > 0 and "error" not in out["server"], out
    assert out["model"] == f"headavatar-{CAPTURE}" and out["model_version"] == "1" and out["champion"] == "1"
    six = out["stages"]["gaussianhead"]
    assert out["tracked_stages"] == ["gaussianhead"] and six["outcome"] == "registered as model"
    assert six["state"] == "done" and 0 < six["tracking_s"] < six["wall_s"] and six["during"] == "stage 6"
    assert 0 < out["capture_start_to_registered_version_s"] < time.time() - started_at
    assert out["versions"][0]["source"].endswith("/avatar") and out["versions"][0]["holdout_psnr"] == "45.9"
    assert server.server.proc.poll() is not None  # stopped
    assert (tmp_path / "logs" / "register" / "gaussianhead.log").exists()

    gone = TrackingServer(tmp_path / "other", {**os.environ}, BUCKET, str(tmp_path / "not-installed"), period=0.2)
    skipped = register(gone, {**os.environ}, ["sample"], {}, [], tmp_path / "logs", wait=0.3)
    assert skipped["skipped"] == "mlflow was not installed within 0 s" and "stages" not in skipped

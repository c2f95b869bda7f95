"""The GPU pipeline bench's bookkeeping, on the CPU: how attempts of a stage add up, what a stage stopped
at the deadline records, which file a run's results go to. The bench itself runs on a lent GPU
(docs/gpu.md); these are the parts whose mistakes would put wrong figures in a committed result."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from headavatar.bench.e2e_gpu import CAPTURE, TEXTURE_MARKER, capture_texture, main, results_name, so_far, summed
from headavatar.contract.outputs import state_key
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

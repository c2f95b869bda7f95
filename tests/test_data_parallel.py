"""Stage 6 data-parallel (issue 35, item 5): two gloo ranks on the CPU train the avatar one rank trains
with the same global batch, resume from a checkpoint, and die with their stage."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import UPSTREAM_MESHHEAD, cli, copy_stages, tiny_config
from headavatar.contract.stage import read_manifest
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore

# 40 steps of 2 views, evaluated every 20; the mesh head short (stage 6 is what is compared).
ARGS = ("run", "gaussianhead", "--capture", "018", "--profile", "demo",
        "--set", UPSTREAM_MESHHEAD, "--set", "gaussianhead.steps=40",
        "--set", "gaussianhead.eval_every=20",
        "--set", "gaussianhead.checkpoint_every=20", "--set", "gaussianhead.keep_checkpoint_every=0")
TWO = ("--set", "gaussianhead.ranks=2")


def _avatar(store: ObjectStore) -> tuple[dict[str, torch.Tensor], dict, dict]:
    prefix = store.key(stage_prefix("018", "gaussianhead"))
    saved = torch.load(io.BytesIO(store.get_bytes(f"{prefix}/avatar/avatar.pt")), weights_only=True)
    history = json.loads(store.get_bytes(f"{prefix}/history.json"))
    tensors = {f"{m}.{k}": v.float() for m in ("head", "sr") for k, v in saved[m].items()}
    return tensors, history, read_manifest(store, "018", "gaussianhead").metrics


def _rank_processes(pid: int) -> list[psutil.Process]:
    """The spawned ranks among ``pid``'s descendants (not multiprocessing's resource tracker)."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.s3
@pytest.mark.slow
def test_two_gloo_ranks_train_the_avatar_one_rank_trains_and_die_with_their_stage(
        store: ObjectStore, demo_upstream: str, s3_env: dict[str, str]) -> None:
    copy_stages(store, demo_upstream, ("extract", "sample", "matting", "fitting", "meshhead"))

    r = cli(*ARGS, env=s3_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, one_history, one_metrics = _avatar(store)

    # Two ranks, killed (rank 0, as a lost worker is) after the step-20 checkpoint: its rank dies with it.
    prefix = store.key(stage_prefix("018", "gaussianhead"))
    state = f"{prefix}/_state/checkpoint.pt"
    earlier = store.get_bytes(state)  # the one-rank run's step-20 state; --force starts over
    proc = subprocess.Popen([sys.executable, "-m", "headavatar.cli", *ARGS, *TWO, "--force"],
                            env={**os.environ, **s3_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (store.exists(state) and store.get_bytes(state) != earlier):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 400, "no step-20 checkpoint"
            time.sleep(0.2)
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 1, ranks  # rank 1; rank 0 is the stage process itself
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"rank outlived its stage: {alive}"
    assert read_manifest(store, "018", "gaussianhead") is None

    r = cli(*ARGS, *TWO, env=s3_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from the checkpoint at step 20" in r.stderr and "rank 0 of 2 joined (gloo on cpu)" in r.stderr
    two, two_history, two_metrics = _avatar(store)

    # The same global batch: equal up to the order floating-point sums are taken in.
    assert two_metrics["resumed_from_step"] == 20 and two_metrics["steps"] == one_metrics["steps"] == 40
    assert [e["step"] for e in two_history["holdout"]] == [e["step"] for e in one_history["holdout"]] == [0, 20, 40]
    for a, b in zip(one_history["holdout"], two_history["holdout"], strict=True):
        assert abs(a["holdout_psnr"] - b["holdout_psnr"]) < 0.05 and abs(a["holdout_ssim"] - b["holdout_ssim"]) < 1e-3
    for a, b in zip(one_history["losses"], two_history["losses"], strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]), (a, b)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-6)) for k in one)
    print("two ranks against one: PSNR", [round(b["holdout_psnr"] - a["holdout_psnr"], 5) for a, b in
                                         zip(one_history["holdout"], two_history["holdout"], strict=True)],
          "largest parameter difference / tensor's largest value", worst)
    assert worst < 1e-3, worst
    # Not equal for want of training: both learned far more than they differ.
    assert two_history["holdout"][-1]["holdout_psnr"] > two_history["holdout"][0]["holdout_psnr"] + 1


@pytest.mark.s3
def test_a_step_must_split_evenly_over_the_ranks_and_a_run_says_so_at_its_first_task(s3_env: dict[str, str]) -> None:
    r = cli("run", "extract", "--capture", "018", "--profile", "demo", "--set", "gaussianhead.ranks=3", env=s3_env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith(
        "gaussianhead.views_per_step (2) must be a multiple of gaussianhead.ranks (3): each rank takes an equal "
        "share of a step's views"), r.stderr[-2000:]


def _rank(rank: int, folder: Path) -> None:
    """One of two gloo ranks: its share of 5 items, everything gathered back, loss terms averaged."""
    import torch.distributed as dist

    from headavatar.training.data_parallel import gather, mean_over_ranks, shard

    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    mine = shard(list(range(5)))
    out = {"mine": mine, "gathered": gather([x * 10 for x in mine]),
           "mean": float(mean_over_ranks({"loss": torch.tensor(float(rank + 1))})["loss"])}
    dist.destroy_process_group()
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


def test_ranks_take_every_other_item_and_gather_them_back_in_order(tmp_path: Path) -> None:
    """What the trainer shards a step's views and the evaluation sets with (5 items: an uneven split)."""
    import multiprocessing

    procs = [multiprocessing.get_context("spawn").Process(target=_rank, args=(r, tmp_path)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["mine"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert all(r["gathered"] == [0, 10, 20, 30, 40] and r["mean"] == 1.5 for r in ranks), ranks


def _dies_before_joining(rank: int, job) -> None:
    raise SystemExit(3)  # as a rank whose import, device or bucket client fails


def test_a_rank_that_dies_before_joining_fails_the_stage_at_once(tmp_path: Path) -> None:
    """Not after the process group's 10-minute timeout: rank 0 watches the spawned ranks while it waits."""
    from headavatar.training.data_parallel import RankJob, ranks

    job = RankJob("gaussianhead", "018", tiny_config(), {}, {}, tmp_path, 2, None, None)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"gaussianhead rank 1 exited with 3 before joining"), \
            ranks(job, _dies_before_joining, torch.device("cpu")):
        pass
    assert time.monotonic() - t0 < 60

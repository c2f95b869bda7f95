"""Torch's CPU threads follow the CPUs a process may really use: affinity mask and cgroup CPU quota. A GPU
stage runs on a GPU or not at all: a leased GPU torch cannot see, or ``device: cuda`` without CUDA, fails
before any work; ``auto`` on a CPU-only backend runs on the CPU and says so (log and manifest)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_config, upload_capture
from headavatar import devices
from headavatar.contract.manifest import Manifest
from headavatar.contract.stage import manifest_key, read_manifest, run_stage
from headavatar.devices import cgroup_cpu_quota, leased_gpu, parse_cfs, parse_cpu_max, resolve_device, usable_cpus
from headavatar.errors import ConfigError, GpuUnavailable
from headavatar.layout import stage_prefix
from headavatar.stages import build_stages
from headavatar.storage import ObjectStore


def test_cpu_max_and_cfs_quota_parse_to_cpus() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000 100000") == 0.5
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("200000", "100000") == 2.0


def _v2(root: Path, limits: dict[str, str]) -> None:
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for rel, text in limits.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(text)


def test_v2_quota_is_the_tightest_on_the_path_up_to_the_root(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    _v2(root, {"system.slice": "300000 100000\n", "system.slice/docker-abc.scope": "150000 100000\n",
               "other.slice": "50000 100000\n"})
    proc.write_text("0::/system.slice/docker-abc.scope\n")
    assert cgroup_cpu_quota(root, proc) == 1.5
    proc.write_text("0::/system.slice\n")
    assert cgroup_cpu_quota(root, proc) == 3.0
    # Inside a container's cgroup namespace the path is "/" and the root holds the container's limit.
    (root / "cpu.max").write_text("100000 100000\n")
    proc.write_text("0::/\n")
    assert cgroup_cpu_quota(root, proc) == 1.0
    assert usable_cpus(root, proc) == 1
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None
    assert usable_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_v1_cfs_quota_of_the_cpu_controller(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("50000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1  # rounded down, but never below one thread


def test_affinity_mask_caps_torch_threads_in_a_training_stage_process() -> None:
    """resolve_device (which every training stage calls) sets torch's threads from the affinity mask."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to pin to one")
    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from headavatar.devices import resolve_device; resolve_device('cpu'); print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "1"


# --- A GPU stage on a GPU or not at all (issue #34) ---------------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where torch sees no CUDA device")


def test_a_lease_is_what_the_backends_hand_a_gpu_stage(tmp_path: Path) -> None:
    assert leased_gpu({}, tmp_path) is None
    assert leased_gpu({"CUDA_VISIBLE_DEVICES": "1"}, tmp_path) == "CUDA_VISIBLE_DEVICES=1"  # local backend
    for hidden in ("", "-1", "NoDevFiles"):  # every GPU hidden on purpose: no lease, whatever else is set
        assert leased_gpu({"CUDA_VISIBLE_DEVICES": hidden, "NVIDIA_VISIBLE_DEVICES": "0"}, tmp_path) is None
    assert leased_gpu({"NVIDIA_VISIBLE_DEVICES": "GPU-5f3c"}, tmp_path) == "NVIDIA_VISIBLE_DEVICES=GPU-5f3c"  # k8s
    for none in ("void", "none", ""):
        assert leased_gpu({"NVIDIA_VISIBLE_DEVICES": none}, tmp_path) is None
    # The CUDA image says "all": a GPU only where the runtime put the NVIDIA device nodes in.
    assert leased_gpu({"NVIDIA_VISIBLE_DEVICES": "all"}, tmp_path) is None
    (tmp_path / "nvidiactl").touch()
    assert leased_gpu({"NVIDIA_VISIBLE_DEVICES": "all"}, tmp_path) == "NVIDIA_VISIBLE_DEVICES=all"


@NO_CUDA
def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # a GPU leased, none in sight
    for name in ("auto", "cuda", "cuda:0"):
        with pytest.raises(GpuUnavailable, match=r"CUDA_VISIBLE_DEVICES=0.*meshhead\.device=cpu") as e:
            resolve_device(name, "meshhead.device")
        assert "\n" not in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")  # said on purpose: obeyed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match=r"^fitting\.device=cuda but torch sees no CUDA device") as c:
        resolve_device("cuda", "fitting.device")
    assert "\n" not in str(c.value) and GpuUnavailable.exit_code != ConfigError.exit_code == 2
    monkeypatch.setattr(devices, "_said_cpu", False)
    with caplog.at_level(logging.WARNING, logger="headavatar.devices"):
        assert resolve_device("auto") == resolve_device("auto") == torch.device("cpu")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["device=auto runs on the CPU"]  # once


def _fake_upstream(store: ObjectStore, stage: str) -> None:
    """Manifests of a stage's inputs (no files): enough for run_stage to reach the stage's own code."""
    for dep in build_stages()[stage].inputs:
        m = Manifest(stage=dep, capture="018", package_version="0", config_digest="x", config={},
                     inputs={}, files={})
        store.put_bytes(manifest_key(store, "018", dep), m.to_json())


def _outputs(store: ObjectStore, stage: str) -> list[str]:
    prefix = store.key(stage_prefix("018", stage))
    return [o.key[len(prefix) + 1:] for o in store.list(prefix) if not o.key[len(prefix) + 1:].startswith("_")]


@NO_CUDA
@pytest.mark.s3
def test_a_leased_gpu_torch_cannot_see_fails_the_stage_at_once_and_is_retried(
        store: ObjectStore, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    _fake_upstream(store, "meshhead")
    r = cli("run", "meshhead", "--capture", "018", "--profile", "demo",
            env={**s3_env, "CUDA_VISIBLE_DEVICES": "0"}, timeout=120)
    assert r.returncode == GpuUnavailable.exit_code == 75, r.stderr[-2000:]  # retried (docs/failures.md)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a GPU was leased to this task (CUDA_VISIBLE_DEVICES=0) but torch sees no "
                           "CUDA device"), r.stderr[-2000:]
    assert "device=cpu" in last and "Traceback" not in r.stderr
    assert read_manifest(store, "018", "meshhead") is None and _outputs(store, "meshhead") == []  # no work done


@NO_CUDA
@pytest.mark.s3
def test_device_cuda_without_cuda_is_a_config_error(store: ObjectStore, s3_env: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    _fake_upstream(store, "meshhead")
    r = cli("run", "meshhead", "--capture", "018", "--profile", "demo", "--set", "meshhead.device=cuda",
            env=s3_env, timeout=120)
    assert r.returncode == ConfigError.exit_code == 2, r.stderr[-2000:]  # fails for good: a retry cannot help
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: device=cuda but torch sees no CUDA device"), r.stderr[-2000:]
    assert "CUDA_VISIBLE_DEVICES unset" in last and "Traceback" not in r.stderr
    assert read_manifest(store, "018", "meshhead") is None and _outputs(store, "meshhead") == []


@NO_CUDA
@pytest.mark.s3
@pytest.mark.slow
def test_auto_without_a_gpu_trains_on_the_cpu_and_the_log_and_manifest_say_so(
        store: ObjectStore, s3_env: dict[str, str], tiny_capture: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    # The cheapest run of a GPU-capable stage: stages 1-2 on 3 cameras, 3 frames of one sequence, a short fit.
    small = ("capture.cameras=[222200038,222200039,222200041]", "capture.include_sequences=[EXP-1-head]",
             "extract.frame_stride=9", "sample.frame_stride=1", "fitting.pose_steps=2", "fitting.all_steps=2")
    upload_capture(store, tiny_capture)
    for stage in ("extract", "sample"):  # stages 1-2, in this process
        run_stage(build_stages()[stage], "018", tiny_config(*small), store)
    r = cli("run", "fitting", "--capture", "018", "--profile", "demo", *(a for o in small for a in ("--set", o)),
            env=s3_env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "runs on the CPU" in line]
    assert len(said) == 1 and "WARNING headavatar.devices: device=auto runs on the CPU: torch sees no CUDA " \
        "device" in said[0] and "no GPU was leased to this task (CUDA_VISIBLE_DEVICES unset)" in said[0], said
    m = read_manifest(store, "018", "fitting")
    assert m is not None and m.device == "cpu"
    assert json.loads(store.get_bytes(manifest_key(store, "018", "fitting")))["device"] == "cpu"
    sample = read_manifest(store, "018", "sample")
    assert sample is not None and sample.device == ""  # a CPU stage chooses no device

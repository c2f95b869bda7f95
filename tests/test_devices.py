"""Torch's CPU threads follow the CPUs a process may really use: affinity mask and cgroup CPU quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from headavatar.devices import cgroup_cpu_quota, parse_cfs, parse_cpu_max, usable_cpus


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

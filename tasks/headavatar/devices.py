"""Torch device selection, CPU thread count and optional-backend discovery shared by the GPU-capable stages.

Every training stage resolves its device here, so this is also where torch's intra-op thread count
is matched to the CPUs the process may really use: its affinity mask (``taskset``, a Kubernetes
CPU manager) and its cgroup's CPU quota (``docker run --cpus``, a pod's CPU limit). Torch's own
default counts the machine's cores, and on a shared or limited machine that oversubscribes the
CPUs it gets: CPU training ran about 8x slower beside one busy process.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")
_threads_set = False


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else is taken as given."""
    match_cpu_threads()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def installed(module: str) -> bool:
    """Whether an optional backend can be imported, without importing it (CUDA extensions are slow)."""
    return importlib.util.find_spec(module) is not None


def match_cpu_threads() -> int:
    """Set torch's intra-op threads to :func:`usable_cpus` once per process (an explicit
    ``OMP_NUM_THREADS`` wins); returns the thread count in use."""
    global _threads_set
    if not _threads_set and not os.environ.get("OMP_NUM_THREADS"):
        threads = usable_cpus()
        if threads != torch.get_num_threads():
            log.info("torch CPU threads: %d (was %d)", threads, torch.get_num_threads())
            torch.set_num_threads(threads)
    _threads_set = True
    return torch.get_num_threads()


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) -> CPUs, None when unlimited."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = int(fields[0]), int(fields[1])
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` -> CPUs, None when unlimited (quota -1)."""
    quota, period = int(quota_us.strip()), int(period_us.strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (v2, else v1), in CPUs."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths = {}
    for line in lines:  # "<id>:<controllers>:<path>"
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    limits: list[float] = []
    if (root / "cgroup.controllers").exists():  # v2: one hierarchy
        for folder in _ancestors(root, paths.get("", "/")):
            text = _read(folder / "cpu.max")
            if text and (cpus := parse_cpu_max(text)) is not None:
                limits.append(cpus)
    else:  # v1: the cpu controller's own hierarchy
        rel = next((p for c, p in paths.items() if "cpu" in c.split(",")), "/")
        base = next((root / d for d in ("cpu,cpuacct", "cpu") if (root / d).is_dir()), None)
        for folder in _ancestors(base, rel) if base else []:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and (cpus := parse_cfs(quota, period)) is not None:
                limits.append(cpus)
    return min(limits) if limits else None


def _ancestors(root: Path, rel: str) -> list[Path]:
    """The cgroup folder of ``rel`` under ``root`` and each parent up to ``root`` (inside a container's
    cgroup namespace ``rel`` is ``/`` and the root itself is the container's cgroup)."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None

"""Torch device selection, CPU thread count and optional-backend discovery shared by the GPU-capable stages.

Every training stage resolves its device here, so this is also where torch's intra-op thread count
is matched to the CPUs the process may really use: its affinity mask (``taskset``, a Kubernetes
CPU manager) and its cgroup's CPU quota (``docker run --cpus``, a pod's CPU limit). Torch's own
default counts the machine's cores, and on a shared or limited machine that oversubscribes the
CPUs it gets: CPU training ran about 8x slower beside one busy process.

It is also where a GPU stage is kept off the CPU: a stage that was given a GPU (:func:`leased_gpu`)
but in which torch sees no CUDA device stops before any work (:class:`GpuUnavailable`, exit 75,
retried), ``device: cuda`` without CUDA is a config error (exit 2), and ``auto`` that falls back
to the CPU says so on stderr. The device chosen goes into the stage's manifest (``device``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from headavatar.contract.manifest import record_device
from headavatar.errors import ConfigError, GpuUnavailable

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")
_threads_set = False
_said_cpu = False
# CUDA_VISIBLE_DEVICES values that hide every GPU on purpose (SLURM writes NoDevFiles), and
# NVIDIA_VISIBLE_DEVICES values that give the container none.
_HIDDEN = {"", "none", "void", "nodevfiles"}


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """The torch device of ``name`` (a stage's ``setting``): ``auto`` is CUDA when present, else the CPU;
    anything else is taken as given. Checked before any work:

    * a GPU was leased to this process (:func:`leased_gpu`) and torch sees no CUDA device, with
      ``auto`` or ``cuda``: :class:`GpuUnavailable` (retried; ``cpu`` is obeyed);
    * ``cuda``/``cuda:N`` without CUDA (no lease), or N past the devices torch sees: :class:`ConfigError`;
    * ``auto`` without CUDA and without a lease: the CPU, said once a process as a warning on stderr.

    The device chosen is recorded for the manifest of the stage running (``Manifest.device``).
    """
    device = _cuda_or_cpu(name, setting) if name == "auto" or name.startswith("cuda") else torch.device(name)
    match_cpu_threads()
    record_device(f"cuda:{device.index or 0}" if device.type == "cuda" else str(device))
    return device


def _cuda_or_cpu(name: str, setting: str) -> torch.device:
    global _said_cpu
    with warnings.catch_warnings(record=True) as said:  # torch says why CUDA failed to start, as a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        device = torch.device("cuda" if name == "auto" else name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting}={name}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                              f"set {setting}=cuda or auto")
        return device
    why = _why_no_cuda(said)
    key = setting if "." in setting else f"<stage>.{setting}"  # the key to --set
    lease = leased_gpu()
    if lease is not None:
        raise GpuUnavailable(f"a GPU was leased to this task ({lease}) but torch sees no CUDA device ({why}); "
                             f"{setting}={name} would train on the CPU, many times slower: stopped before any "
                             f"work, to be retried ({key}=cpu trains on the CPU on purpose)")
    if name != "auto":
        raise ConfigError(f"{setting}={name} but torch sees no CUDA device ({why}) and no GPU was leased to "
                          f"this task ({_no_lease()}): run it on a GPU worker, or set {key}=auto or cpu")
    if not _said_cpu:
        log.warning("%s=auto runs on the CPU: torch sees no CUDA device (%s) and no GPU was leased to this "
                    "task (%s); training is many times slower than on a GPU", setting, why, _no_lease())
        _said_cpu = True
    return torch.device("cpu")


def _why_no_cuda(said: list[warnings.WarningMessage]) -> str:
    """One line on why torch has no CUDA: a CPU-only build, or what it warned when CUDA failed to start."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    warned = next((" ".join(str(w.message).split())[:200] for w in said if "cuda" in str(w.message).lower()), "")
    return f"torch {torch.__version__}, CUDA {torch.version.cuda} build: " + (
        warned or "no NVIDIA driver loaded, one too old for this build, or no GPU in sight")


def _no_lease() -> str:
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if cuda is None else f"CUDA_VISIBLE_DEVICES={cuda!r}"


def leased_gpu(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> str | None:
    """How a GPU was given to this process (``VARIABLE=value``), None when none was.

    ``CUDA_VISIBLE_DEVICES`` naming a device: the local backend's lease (docs/gpu.md); a value that hides
    every GPU (empty, ``-1``, ``NoDevFiles``) means none, whatever else is set. ``NVIDIA_VISIBLE_DEVICES``
    naming devices: a Kubernetes pod's ``nvidia.com/gpu`` (the device plugin) or a container's device
    request. ``NVIDIA_VISIBLE_DEVICES=all`` is the CUDA image's default and counts only where the container
    runtime put the NVIDIA device nodes in (``/dev/nvidiactl``): the docker backend's request for the
    leased GPU; that image run without one (``HEADAVATAR_DOCKER_GPUS=0``) has no such node.
    """
    env = os.environ if environ is None else environ
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        hidden = cuda.strip().lower() in _HIDDEN or cuda.strip().startswith("-")
        return None if hidden else f"CUDA_VISIBLE_DEVICES={cuda}"
    nvidia = env.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is None or nvidia.strip().lower() in _HIDDEN:
        return None
    if nvidia.strip().lower() != "all" or (dev / "nvidiactl").exists():
        return f"NVIDIA_VISIBLE_DEVICES={nvidia}"
    return None


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

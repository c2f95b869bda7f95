"""GPU leases: each running GPU task holds its GPUs of its host (one, or one per data-parallel rank), so
concurrent GPU stages never share one.

The ``headavatar_gpu`` pool bounds how many GPU tasks run at once but cannot say *which* GPU a task
gets (Docker's ``count=1`` request is GPU 0 every time; an unset ``CUDA_VISIBLE_DEVICES`` is GPU 0
for torch). A lease is an exclusive ``flock`` on ``<lease dir>/gpu-<device>.lock``, taken by the
task process before it starts the stage. The kernel drops the lock when the last process holding it
exits, however it exits (SIGKILL, OOM, a lost worker). The stage holds it as long as the task: a
stage subprocess inherits the lock's descriptor, and a stage container, which no descriptor can
follow, is labelled ``headavatar.gpu=<device>`` and its GPU is skipped while it runs. So a stage
that outlives a killed task process keeps its GPU until it ends. The lock file holds who has it
(``cat`` it to see). Kubernetes takes none: the device plugin places pods (``nvidia.com/gpu``: one per
GPU the stage uses).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headavatar_airflow.execution import ExecutionSettings

log = logging.getLogger(__name__)


def host_gpus(settings: ExecutionSettings) -> tuple[str, ...]:
    """The GPUs tasks are placed on: ``HEADAVATAR_GPU_DEVICES``, else the indices ``nvidia-smi`` lists, else none."""
    if settings.gpu_devices:
        return settings.gpu_devices
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def _lock_path(lease_dir: Path, device: str) -> Path:
    return lease_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


GPU_LABEL = "headavatar.gpu"  # on a GPU stage's container: the device it was leased
HOST_LABEL = "headavatar.host"  # on every stage container: the host (HEADAVATAR_HOST) whose task started it


@dataclass(frozen=True)
class GpuLease:
    """Held GPUs: ``device``, their indices comma-joined (for ``CUDA_VISIBLE_DEVICES``, a Docker device
    request and the container label), and ``fds``, the locked descriptors, for a stage subprocess to
    inherit (``pass_fds``)."""

    device: str
    fds: tuple[int, ...]


def _try_lock(lease_dir: Path, device: str, holder: str) -> int | None:
    fd = os.open(_lock_path(lease_dir, device), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} pid={os.getpid()}\n".encode())
    except OSError:
        os.close(fd)
        raise
    return fd


@contextmanager
def gpu_lease(devices: Sequence[str], lease_dir: Path, holder: str = "", poll_s: float = 1.0,
              busy: Callable[[], set[str]] = set, count: int = 1) -> Iterator[GpuLease]:
    """Hold ``count`` free devices of ``devices`` for the ``with`` block; waits (polling) until that many are.

    All or none: a task that needs two GPUs (data-parallel stage 6) takes both at once or holds none
    while it waits, so two such tasks can never each hold one and wait for the other. ``devices`` of one
    item is a pinned GPU: the task waits for that one. ``busy``: devices in use by stages no lock shows
    (containers of killed tasks); they are not leased while they are.
    """
    if len(devices) < count or count < 1:
        raise ValueError(f"{count} GPU(s) asked for, {len(devices)} on this host ({', '.join(devices) or 'none'})")
    lease_dir.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        in_use = busy()
        held: list[tuple[str, int]] = []
        try:
            for device in devices:
                if len(held) == count:
                    break
                fd = None if device in in_use else _try_lock(lease_dir, device, holder)
                if fd is not None:
                    held.append((device, fd))
            if len(held) == count:
                yield GpuLease(",".join(d for d, _ in held), tuple(fd for _, fd in held))
                return
        finally:  # this process's descriptors; a lock lasts while a stage still has one. Fewer than asked
            for _, fd in held:  # for: none is kept while waiting
                os.close(fd)
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.info("fewer than %d of the GPUs free (%s): waiting", count, ", ".join(devices))
        time.sleep(poll_s)


@contextmanager
def placed_gpu(settings: ExecutionSettings, params: dict[str, Any], holder: str,
               busy: Callable[[], set[str]] = set, count: int = 1) -> Iterator[GpuLease | None]:
    """The GPUs (``count``) a GPU task runs on, leased for the ``with`` block: the form's ``gpu`` when set
    (it wins; one GPU only), else free ones of this host. None when the host's GPUs are unknown (no lease;
    the old behaviour)."""
    pinned = params.get("gpu")
    if pinned is not None and count > 1:
        raise ValueError(f"the run pins GPU {pinned} but this task needs {count} GPUs: leave 'GPU index' empty")
    devices = (str(pinned),) if pinned is not None else host_gpus(settings)
    if not devices:
        # Stages as subprocesses on a host without the NVIDIA driver (the demo's CPU): nothing to lease.
        # A container engine's GPUs are not seen from the scheduler's container: there it stays a warning.
        if settings.backend == "local" and shutil.which("nvidia-smi") is None:
            log.info("no GPU on this host (no nvidia-smi, HEADAVATAR_GPU_DEVICES unset): no GPU lease")
        else:
            log.warning("GPUs of this host unknown (set HEADAVATAR_GPU_DEVICES): the GPU is not chosen per task")
        yield None
        return
    with gpu_lease(devices, Path(settings.gpu_lease_dir), holder, busy=busy, count=count) as lease:
        log.info("GPU %s leased to %s", lease.device, holder)
        yield lease

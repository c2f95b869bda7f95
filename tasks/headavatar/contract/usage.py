"""What one stage run cost: CPU seconds, peak memory, GPU time and memory, scratch disk.

Recorded in the manifest's metrics by the runner, so ``headavatar costs`` and the capacity-planning
page read measured numbers per capture instead of estimates. CPU time counts this process, the
children it waited for, and workers the stage reports itself (``worker_cpu_s``: stage 1's camera
workers, forked by a server process); peak RSS is the largest single process. GPU time is the
stage's wall time when it used CUDA (the device is held for the whole run); scratch is the run
directory's size when the computation ended (what a stage keeps until its uploads finish).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# A stage whose workers are not this process's children (a forkserver's) reports their CPU time under
# this metric; the runner adds it to ``cpu_s``.
WORKER_CPU_METRIC = "worker_cpu_s"


class ResourceUsage:
    """Started before a stage computes; :meth:`finish` gives the metrics of the run."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def finish(self, scratch: Path) -> dict[str, float]:
        now_self = resource.getrusage(resource.RUSAGE_SELF)
        now_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(getattr(now, f) - getattr(before, f)
                  for now, before in ((now_self, self._self), (now_children, self._children))
                  for f in ("ru_utime", "ru_stime"))
        out = {"cpu_s": round(cpu, 2),
               "peak_rss_mb": round(max(now_self.ru_maxrss, now_children.ru_maxrss) / 1024, 1),  # KiB on Linux
               "scratch_mb": round(_tree_bytes(scratch) / 2**20, 1)}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_s"] = round(time.monotonic() - self._t0, 2)
            out["peak_gpu_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        return out

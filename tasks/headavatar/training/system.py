"""CPU, memory and GPU usage of the training process, sampled at the loss-logging steps.

Samples go into the training history (and so into the checkpoint and ``history.json``), so they
reach MLflow even when the tracking server was down during training. Reads /proc and torch only:
no extra dependency; GPU utilisation is added when NVML (``nvidia-ml-py``) is importable.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _meminfo_gb(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class SystemSampler:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._cpu, self._wall = self._times()

    @staticmethod
    def _times() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def sample(self) -> dict[str, float]:
        """Usage since the previous sample: cpu_percent is of one core (200 = two cores busy)."""
        cpu, wall = self._times()
        out = {"cpu_percent": 100 * (cpu - self._cpu) / max(wall - self._wall, 1e-6)}
        self._cpu, self._wall = cpu, wall
        with open("/proc/self/statm") as f:
            out["rss_gb"] = int(f.read().split()[1]) * _PAGE / 2**30
        out["host_available_gb"] = _meminfo_gb("MemAvailable")
        if self.device.type == "cuda":
            out["gpu_memory_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            out["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            with contextlib.suppress(Exception):  # no NVML on this host
                out["gpu_utilization_percent"] = float(torch.cuda.utilization(self.device))
        return out

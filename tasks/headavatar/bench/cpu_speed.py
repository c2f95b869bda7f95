"""How fast this machine's CPU trains, in seconds for a fixed workload: what scales a measured time to here.

The demo's estimate comes from a ``make demo`` timed on another machine (``benchmarks/results/
demo_times_<backend>.json``); cores of the same count differ by a third between hosts of one cloud. The
demo times this workload when it starts and records it, the bench records it with its times, and the
estimate is the bench's time multiplied by the ratio. The workload is what dominates the demo: the
forward and backward passes of small convolutions and MLPs in PyTorch on all cores (stages 5 and 6).
"""

from __future__ import annotations

import statistics
import time


def workload_s(repeats: int = 3) -> float:
    """Median seconds of one round of the workload (about half a second on a 2-core cloud VM)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 16, 96, 96, generator=gen)
    points = torch.randn(4096, 128, generator=gen)
    conv = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 3,
                                                                                                         padding=1))
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))

    def one_round() -> float:
        t = time.perf_counter()
        for _ in range(8):
            loss = conv(images).square().mean() + mlp(points).square().mean()
            loss.backward()
        return time.perf_counter() - t

    one_round()  # warm-up: allocator, thread pool
    return round(statistics.median(one_round() for _ in range(repeats)), 4)

"""Capacity planning from measured numbers: what N captures a day need in GPUs, disk and object storage.

Per-stage costs come from the whole capture at real size (``e2e_real_size_gpu.json``: 16 cameras at
2200x3208, the default strides and profile: wall time, peak host and GPU memory, bytes stored, and the
training steps' rates), scaled to a capture of ``kept_frames`` frames and the default step counts of the
schema; matting's rate from ``matting_gpu.json`` (BMV2, which that run replaced by classical matting),
and stage 6's stored bytes from the small end-to-end run (``e2e_gpu.json``), since the real-size stage 6
has not yet finished. Every assumption is printed with the result (``docs/capacity.md`` is generated
from :func:`markdown`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from headavatar.bench.tables import _table, load, provenance
from headavatar.settings import GaussianHeadConfig, MeshHeadConfig

CAMERAS = 16
REAL_SIZE = "e2e_real_size_gpu"
SOURCES = (REAL_SIZE, "matting_gpu", "e2e_gpu")
GPU_UTILISATION = 0.8  # share of a GPU-day the pool keeps busy (queueing, retries, start-up)
# GPUs per machine in the per-day table: a Celery GPU host (docs/deploy-multi-host.md) and a Kubernetes node.
CELERY_HOST_GPUS, K8S_NODE_GPUS = 4, 8


@dataclass(frozen=True)
class StageCost:
    stage: str
    gpu: bool
    seconds: float  # wall seconds of one capture (GPU seconds for GPU stages)
    peak_host_gib: float
    peak_gpu_gib: float
    stored_gb: float
    basis: str


def stage5_wall() -> tuple[float, int]:
    """Stage 5 at real size: its wall seconds and steps. It ran eagerly (``meshhead.compile=false``: its
    compiled step failed at real size in the first run; the training loop now goes on eagerly then)."""
    st = load(REAL_SIZE)["stages"]["meshhead"]
    return st["wall_s"], int(st["metrics"]["steps"])


def stage6_step() -> tuple[float, float]:
    """Stage 6 at real size: ms a step with its evaluations and checkpoints, and seconds from the stage's
    start to its first step (loading the views, compiling) less gsplat's just-in-time extension build,
    which the CUDA image does when it is built."""
    log = load(REAL_SIZE)["stages"]["gaussianhead"]["from_the_log"]
    return log["ms_per_step_10000_to_15000"], log["stage_start_to_step_1_s"] - log["gsplat_extension_build_s"]


def stage_costs(kept_frames: int) -> list[StageCost]:
    """One capture with ``kept_frames`` kept frames x 16 cameras, default profile, default step counts."""
    st, matting = load(REAL_SIZE)["stages"], load("matting_gpu")
    run_images = st["matting"]["metrics"]["images"]  # kept frames x cameras in the real-size run
    images = kept_frames * CAMERAS
    scale = images / run_images

    def peaks(stage: str, gpu: bool) -> tuple[float, float]:
        return st[stage]["peak_host_mib"] / 1024, (st[stage]["peak_gpu_mib"] / 1024) if gpu else 0.0

    def per_image(stage: str, gpu: bool) -> StageCost:
        r = st[stage]
        return StageCost(stage, gpu, r["wall_s"] * scale, *peaks(stage, gpu), r["metrics"]["bytes"] * scale / 1e9,
                         f"real size: {r['wall_s']} s per {run_images} images, scaled")

    fps = max(r["fps"] for r in matting["runs"] if r["dtype"] == "float16")
    mh_wall, mh_run_steps = stage5_wall()
    gh_ms, gh_start = stage6_step()
    mh_steps, gh_steps = MeshHeadConfig().steps, GaussianHeadConfig().steps
    gh_bytes = load("e2e_gpu")["stages"]["gaussianhead"]["metrics"]["bytes"]
    return [
        per_image("extract", False),
        per_image("sample", False),
        StageCost("matting", True, images / fps, peaks("matting", False)[0],
                  max(r["peak_gpu_mem_gib"] for r in matting["runs"] if r["dtype"] == "float16"),
                  st["matting"]["metrics"]["bytes"] * scale / 1e9,
                  f"BMV2 fp16 batch 8: {fps} frames/s; host memory and bytes: the real-size run's classical matting"),
        per_image("fitting", True),
        StageCost("meshhead", True, mh_wall * mh_steps / mh_run_steps, *peaks("meshhead", True),
                  st["meshhead"]["metrics"]["bytes"] / 1e9,
                  f"real size: {mh_wall} s for {mh_run_steps} steps, eager (compile=false), scaled"),
        StageCost("gaussianhead", True, gh_steps * gh_ms / 1000 + gh_start, *peaks("gaussianhead", True),
                  gh_bytes / 1e9, f"{gh_steps} steps at {gh_ms:.1f} ms (real size, compile on, evaluations "
                  f"included) + {gh_start:.0f} s start-up, both at 14 kept frames; stored: the small run's"),
    ]


def plan(captures_per_day: int, kept_frames: int) -> dict[str, Any]:
    costs = stage_costs(kept_frames)
    gpu_s = sum(c.seconds for c in costs if c.gpu)
    cpu_s = sum(c.seconds for c in costs if not c.gpu)
    gpus = math.ceil(captures_per_day * gpu_s / (86_400 * GPU_UTILISATION))
    stored = sum(c.stored_gb for c in costs)
    return {"captures_per_day": captures_per_day, "gpu_hours_per_day": captures_per_day * gpu_s / 3600,
            "gpus": max(1, gpus), "cpu_stage_hours_per_day": captures_per_day * cpu_s / 3600,
            "stored_tb_per_day": captures_per_day * stored / 1000, "stored_gb_per_capture": stored,
            "gpu_s_per_capture": gpu_s}


def markdown(kept_frames: int = 100, per_day: tuple[int, ...] = (1, 5, 10, 20, 50)) -> str:
    costs = stage_costs(kept_frames)
    rows = [[c.stage, "GPU" if c.gpu else "CPU", f"{c.seconds:.0f} s", f"{c.peak_host_gib:.1f} GiB",
             f"{c.peak_gpu_gib:.1f} GiB" if c.gpu else "", f"{c.stored_gb:.2f} GB", c.basis] for c in costs]
    per_capture = _table(["stage", "runs on", "time per capture", "peak host memory", "peak GPU memory",
                          "stored in the bucket", "basis"], rows)
    plans = [plan(n, kept_frames) for n in per_day]
    rows = [[p["captures_per_day"], f"{p['gpu_hours_per_day']:.1f}", p["gpus"],
             math.ceil(p["gpus"] / CELERY_HOST_GPUS), math.ceil(p["gpus"] / K8S_NODE_GPUS),
             f"{p['cpu_stage_hours_per_day']:.2f}", f"{p['stored_tb_per_day'] * 1000:.0f} GB",
             f"{p['stored_tb_per_day'] * 365:.1f} TB"] for p in plans]
    per_day_table = _table(["captures / day", "GPU-hours / day", "GPUs (80% busy)",
                            f"{CELERY_HOST_GPUS}-GPU hosts (compose + Celery)",
                            f"{K8S_NODE_GPUS}-GPU nodes (Kubernetes)", "CPU-stage hours / day",
                            "bucket growth / day", "bucket growth / year"], rows)
    gpu_s = sum(c.seconds for c in costs if c.gpu)
    gh = next(c for c in costs if c.stage == "gaussianhead")
    summary = (f"One capture needs {gpu_s / 3600:.1f} GPU-hours, {100 * gh.seconds / gpu_s:.0f}% of them in the "
               f"Gaussian head; one GPU finishes {86_400 * GPU_UTILISATION / gpu_s:.1f} captures a day at "
               f"{GPU_UTILISATION:.0%} utilisation. In the real-size run (14 kept frames: the memory columns "
               f"are its peaks, not scaled) the largest GPU stage took "
               f"{max(c.peak_gpu_gib for c in costs):.1f} GiB of GPU memory and the largest stage "
               f"{max(c.peak_host_gib for c in costs):.1f} GiB of host memory; stage 6's training views add "
               f"~21 MB each at 2048² ({kept_frames * CAMERAS} at {kept_frames} kept frames). A capture adds "
               f"{sum(c.stored_gb for c in costs):.1f} GB to the bucket.")
    return (f"### Per capture ({kept_frames} kept frames x {CAMERAS} cameras, default profile)\n\n{per_capture}\n\n"
            f"{summary}\n\n"
            f"### Per day\n\n{per_day_table}\n\nSources: "
            + " ".join(provenance(load(name)) for name in SOURCES) + "\n")

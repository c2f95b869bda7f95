"""Capacity planning from measured numbers: what N captures a day need in GPUs, disk and object storage.

Per-stage costs come from the end-to-end GPU run (``e2e_gpu.json``: wall time, peak host memory, bytes
stored, per image of 16 cameras) and the newest component benchmarks of the default code
(``matting_gpu.json``: BMV2 frames/s; ``meshhead_speed_gpu.json``: the compiled stage-5 step;
``stage6_compile_gpu.json``: the compiled stage-6 step, the same figure docs/gpu.md reports), scaled to a
capture of ``kept_frames`` frames and the default step counts of the schema. Every assumption is printed
with the result (``docs/capacity.md`` is generated from :func:`markdown`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from headavatar.bench.tables import _table, load, provenance
from headavatar.settings import GaussianHeadConfig, MeshHeadConfig

CAMERAS = 16
SOURCES = ("e2e_gpu", "matting_gpu", "meshhead_speed_gpu", "stage6_compile_gpu")
GPU_UTILISATION = 0.8  # share of a GPU-day the pool keeps busy (queueing, retries, start-up)


@dataclass(frozen=True)
class StageCost:
    stage: str
    gpu: bool
    seconds: float  # wall seconds of one capture (GPU seconds for GPU stages)
    peak_host_gib: float
    peak_gpu_gib: float
    stored_gb: float
    basis: str


def stage5_step() -> tuple[float, float]:
    """The default stage-5 step (ms, the mean of its measurements) and its peak GPU memory (GiB)."""
    summary = load("meshhead_speed_gpu")["summary"]
    runs = summary["step_ms"]["after_default_bf16_compile"]
    return sum(runs) / len(runs), summary["peak_gpu_gib"]["after"]


def stage6_step() -> tuple[float, float]:
    """The default stage-6 step (ms, median of its runs) and its peak GPU memory (GiB)."""
    r = load("stage6_compile_gpu")["bf16_compile"]
    return r["median_ms"], r["peak_gpu_gib"]


def stage_costs(kept_frames: int) -> list[StageCost]:
    """One capture with ``kept_frames`` kept frames x 16 cameras, default profile, default step counts."""
    e2e, matting = load("e2e_gpu"), load("matting_gpu")
    st = e2e["stages"]
    e2e_images = st["matting"]["metrics"]["images"]  # kept frames x cameras in the e2e run
    images = kept_frames * CAMERAS
    scale = images / e2e_images

    def per_image(stage: str, gpu: bool, basis: str) -> StageCost:
        r = st[stage]
        return StageCost(stage, gpu, r["wall_s"] * scale, r["peak_host_mib"] / 1024,
                         (r["peak_gpu_mib"] / 1024) if gpu else 0.0, r["metrics"]["bytes"] * scale / 1e9, basis)

    fps = max(r["fps"] for r in matting["runs"] if r["dtype"] == "float16")
    mh_ms, mh_gib = stage5_step()
    gh_ms, gh_gib = stage6_step()
    mh_rate, gh_rate = 1000 / mh_ms, 1000 / gh_ms
    mh_steps, gh_steps = MeshHeadConfig().steps, GaussianHeadConfig().steps
    return [
        per_image("extract", False, f"e2e: {st['extract']['wall_s']} s per {e2e_images} images, scaled"),
        per_image("sample", False, f"e2e: {st['sample']['wall_s']} s per {e2e_images} images, scaled"),
        StageCost("matting", True, images / fps, st["matting"]["peak_host_mib"] / 1024,
                  max(r["peak_gpu_mem_gib"] for r in matting["runs"] if r["dtype"] == "float16"),
                  st["matting"]["metrics"]["bytes"] * scale / 1e9, f"BMV2 fp16 batch 8: {fps} frames/s"),
        per_image("fitting", True, f"e2e: {st['fitting']['wall_s']} s per {e2e_images} images, scaled"),
        StageCost("meshhead", True, mh_steps / mh_rate, st["meshhead"]["peak_host_mib"] / 1024, mh_gib,
                  st["meshhead"]["metrics"]["bytes"] / 1e9, f"{mh_steps} steps at {mh_ms:.1f} ms (compiled, bf16)"),
        StageCost("gaussianhead", True, gh_steps / gh_rate, st["gaussianhead"]["peak_host_mib"] / 1024, gh_gib,
                  st["gaussianhead"]["metrics"]["bytes"] / 1e9, f"{gh_steps} steps at {gh_ms:.1f} ms (compiled, bf16)"),
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
    rows = [[p["captures_per_day"], f"{p['gpu_hours_per_day']:.1f}", p["gpus"], math.ceil(p["gpus"] / 8),
             f"{p['cpu_stage_hours_per_day']:.2f}", f"{p['stored_tb_per_day'] * 1000:.0f} GB",
             f"{p['stored_tb_per_day'] * 365:.1f} TB"] for p in plans]
    per_day_table = _table(["captures / day", "GPU-hours / day", "GPUs (80% busy)",
                            "8-GPU nodes (Kubernetes)", "CPU-stage hours / day", "bucket growth / day",
                            "bucket growth / year"], rows)
    gpu_s = sum(c.seconds for c in costs if c.gpu)
    gh = next(c for c in costs if c.stage == "gaussianhead")
    summary = (f"One capture needs {gpu_s / 3600:.1f} GPU-hours, {100 * gh.seconds / gpu_s:.0f}% of them in the "
               f"Gaussian head; one GPU finishes {86_400 * GPU_UTILISATION / gpu_s:.1f} captures a day at "
               f"{GPU_UTILISATION:.0%} utilisation. The largest GPU stage needs "
               f"{max(c.peak_gpu_gib for c in costs):.1f} GiB of GPU memory and the largest stage "
               f"{max(c.peak_host_gib for c in costs):.1f} GiB of host memory; a capture adds "
               f"{sum(c.stored_gb for c in costs):.1f} GB to the bucket.")
    return (f"### Per capture ({kept_frames} kept frames x {CAMERAS} cameras, default profile)\n\n{per_capture}\n\n"
            f"{summary}\n\n"
            f"### Per day\n\n{per_day_table}\n\nSources: "
            + " ".join(provenance(load(name)) for name in SOURCES) + "\n")

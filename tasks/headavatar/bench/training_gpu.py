"""Stage 4-5 compute on a GPU without object storage: the fit and mesh-head training steps.

Builds the training views in memory from the synthetic head (true pose and landmarks standing in
for stage 4, exact alpha for stage 3) at the default profile's 256 px, so it runs where only torch
is installed. Reports fitting time and agreement GPU vs CPU, mesh-head step time and peak GPU
memory at the default profile, and the held-out silhouette IoU after ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from headavatar.bench.provenance import stamp
from headavatar.fitting.solver import Observations, fit
from headavatar.imaging import CropResize
from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
from headavatar.render.mesh_raster import build_mesh_rasterizer
from headavatar.settings import FittingConfig, MeshHeadConfig
from headavatar.synthetic.capture import LIGHT, SyntheticSpec, axis_angle_to_matrix, rig, sequence_truth
from headavatar.synthetic.morphable import build_model
from headavatar.synthetic.render import Camera, render
from headavatar.training.views import Views


def _render_one(job: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    vertices, k, extr, size = job
    model = build_model()
    r = render(vertices, model.faces, model.uv, Camera(k, extr, size, size), np.zeros((size, size, 3), np.uint8), LIGHT)
    return r.image[..., ::-1], r.alpha


def synthetic_views(frames: int, size: int, workers: int = 1, sequence: str = "EXP-1-head") -> tuple[Views, np.ndarray]:
    """Every third frame of a synthetic sequence from all 16 cameras, rendered in memory (matte = exact alpha)."""
    spec = SyntheticSpec("018", frames=frames * 3)
    model = build_model()
    intr, extr = rig(spec)
    truth = sequence_truth(spec, model, sequence, frames * 3)
    crop = CropResize(-200, 304, 2600, size, size)
    k = crop.intrinsic(intr)
    idx = np.arange(0, frames * 3, 3)
    cams = list(spec.cameras)
    jobs = [(truth["vertices"][f], k, extr[c], size) for f in idx for c in cams]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            rendered = list(pool.map(_render_one, jobs))
    else:
        rendered = [_render_one(j) for j in jobs]
    images = np.stack([r[0] for r in rendered]).reshape(frames, len(cams), size, size, 3)
    masks = np.stack([r[1] for r in rendered]).reshape(frames, len(cams), size, size)
    centre = model.meanshape.mean(0)
    trans = np.stack([truth["translation"][f] + truth["scale"] * axis_angle_to_matrix(truth["rotation"][f]) @ centre
                      for f in idx])
    views = Views([f"{f:04d}" for f in idx], cams, images, masks, np.full_like(masks, 255),
                  np.broadcast_to(k, (frames, len(cams), 3, 3)).copy(),
                  np.stack([[extr[c][:3] for c in cams]] * frames), np.concatenate([truth["rotation"][idx], trans], 1),
                  float(truth["scale"]), truth["exp_coeff"][idx], truth["landmarks_3d"][idx])
    return views, truth["vertices"][0]


def bench_fitting(views: Views, device: torch.device) -> dict:
    from headavatar.fitting.geometry import project

    model = build_model()
    pts = project(torch.tensor(views.landmarks_3d)[:, None], torch.tensor(views.intrinsics),
                  torch.tensor(views.extrinsics)).numpy()
    noisy = pts + np.random.default_rng(0).normal(0, 1.0, pts.shape)
    conf = np.ones(pts.shape[:3])
    obs = Observations(noisy, conf, views.intrinsics, views.extrinsics, float(views.size))
    out = {}
    fits = {}
    for dev in ("cpu", device.type):
        t = time.perf_counter()
        fits[dev] = fit(model, obs, FittingConfig(), torch.device(dev))
        out[f"fit_seconds_{dev}"] = round(time.perf_counter() - t, 2)
        out[f"reprojection_px_{dev}"] = round(float(np.nanmean(fits[dev].reprojection_error(obs))), 4)
    diff = np.abs(fits["cpu"].rotation - fits[device.type].rotation).max()
    out["rotation_difference_gpu_vs_cpu_deg"] = float(np.rad2deg(diff))
    return out


def bench_meshhead(views: Views, vertices: np.ndarray, cfg: MeshHeadConfig, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    model = init_model(cfg, views, vertices)
    raster = build_mesh_rasterizer(cfg.rasterizer, cfg.edge_softness_px)
    trainer = MeshHeadTrainer(model, views, cfg, raster, device)
    iou0 = trainer.evaluate()["holdout_iou"]
    warm = 5
    cfg_run = cfg.model_copy(update={"steps": warm, "eval_every": 0, "checkpoint_every": 10**9})
    trainer.cfg = cfg_run
    trainer.train(save=lambda _: None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.cfg = cfg_run.model_copy(update={"steps": steps})
    trainer.train(save=lambda _: None)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"grid_resolution": cfg.grid_resolution, "render_size": cfg.render_size,
            "views_per_step": cfg.views_per_step, "steps_timed": steps - warm,
            "step_ms": round(1000 * dt / (steps - warm), 1),
            "steps_per_s": round((steps - warm) / dt, 2),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "holdout_iou_initial": round(iou0, 4), "holdout_iou_after": round(trainer.evaluate()["holdout_iou"], 4),
            "mesh_faces": len(model.neutral()[1]), "rasterizer": raster.name}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    views, vertices = synthetic_views(args.frames, 256)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
              "fitting": bench_fitting(views, device)}
    fixed = MeshHeadConfig(plateau_every=0)  # the plateau rule off: every run trains its steps
    result["meshhead_default_profile"] = bench_meshhead(views, vertices, fixed, device, args.steps)
    stamp(result, "headavatar.bench.training_gpu", argv)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

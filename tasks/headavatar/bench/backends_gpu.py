"""The optional CUDA backends against the defaults, on a GPU where they are installed (CUDA image build args).

* Stage 6: diff-gaussian-rasterization built with 32 channels (``dgr``) against gsplat and the
  PyTorch reference on random 32-channel scenes (agreement, forward + backward time, memory), one
  default-profile training step with each, and held-out PSNR after the same short training.
* Stage 6 initialisation: simple-knn's ``distCUDA2`` against the exact PyTorch scale init.
* Stage 5: the pytorch3d mesh backend against the PyTorch rasteriser on the same mesh head and
  views (agreement of visibility, silhouette, colours and parameter gradients; forward + backward
  time), then default-profile training with each (step time, memory, held-out IoU).
Each part runs only for the backends that are installed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headavatar.bench.gaussianhead_gpu import TrainingSetup, compare_rasterizers, timed
from headavatar.bench.provenance import stamp
from headavatar.bench.training_gpu import bench_meshhead, synthetic_views
from headavatar.devices import installed
from headavatar.meshhead.trainer import init_model, losses, render
from headavatar.render.gaussian_raster import (
    DiffGaussianRasterizer,
    GsplatRasterizer,
    TorchGaussianRasterizer,
    exact_knn_scale,
    knn_scale,
)
from headavatar.render.mesh_raster import PyTorch3DRasterizer, TorchRasterizer
from headavatar.settings import MeshHeadConfig


def gaussian_backends(frames: int, mesh_steps: int, steps: int) -> dict:
    dev = torch.device("cuda")
    dgr = DiffGaussianRasterizer(dev)
    out: dict = {"dgr_num_channels": dgr.channels, "rasterizers": [
        compare_rasterizers(20_000, 512, 32, [TorchGaussianRasterizer(), GsplatRasterizer(), dgr]),
        compare_rasterizers(50_000, 2048, 32, [GsplatRasterizer(), dgr]),
    ]}
    print(json.dumps(out, indent=1), flush=True)
    setup = TrainingSetup.build(frames, mesh_steps)
    out["train_step_default_profile"] = {r.name: setup.time_step(r) for r in (GsplatRasterizer(), dgr)}
    out["training"] = {"steps": steps, "frames": frames}
    for r in (GsplatRasterizer(), dgr):
        t = setup.trainer(r, steps)
        t0 = time.perf_counter()
        t.train(save=lambda _: None)
        out["training"][r.name] = {"seconds": round(time.perf_counter() - t0, 1), **t.state.evals[-1]}
    print(json.dumps({k: out[k] for k in ("train_step_default_profile", "training")}, indent=1), flush=True)
    return out


def knn_backends(n: int = 40_000) -> dict:
    pts = torch.rand(n, 3, generator=torch.Generator().manual_seed(0)).cuda() * 0.3
    exact = exact_knn_scale(pts)
    torch.cuda.synchronize()
    t = time.perf_counter()
    fast = knn_scale(pts)
    torch.cuda.synchronize()
    rel = ((fast - exact).abs() / exact).cpu()
    return {"points": n, "simple_knn_ms": round(1000 * (time.perf_counter() - t), 1),
            "max_rel_diff_vs_exact": float(rel.max()), "median_rel_diff_vs_exact": float(rel.median()),
            "fraction_within_1pct": float((rel < 0.01).float().mean())}


def mesh_backends(frames: int, steps: int) -> dict:
    dev = torch.device("cuda")
    cfg = MeshHeadConfig(plateau_every=0)
    views, vertices = synthetic_views(frames, cfg.render_size)
    torch.manual_seed(0)
    model = init_model(cfg, views, vertices).to(dev)
    batch = views.tensors(torch.zeros(4, dtype=torch.long), torch.arange(4), dev)
    batch["scale"] = torch.tensor(views.scale, device=dev)
    rasters = [TorchRasterizer(cfg.edge_softness_px), PyTorch3DRasterizer(cfg.edge_softness_px)]
    out: dict = {"faces_per_pixel": rasters[1].k, "render_size": cfg.render_size, "views": 4}
    rendered, grads = {}, {}
    for r in rasters:
        def step(r=r) -> None:
            model.zero_grad()
            losses(model, r, batch, cfg.render_size, cfg)[0].backward()

        out[f"{r.name}_loss_fwd_bwd_ms"] = round(timed(step, 10), 2)
        grads[r.name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            rendered[r.name] = render(model, r, batch, cfg.render_size)
    a, b = rendered["torch"], rendered["pytorch3d"]
    out["mesh_faces"] = len(a.faces)
    out["visible_face_agreement"] = float((a.hit == b.hit).float().mean())
    out["max_abs_alpha_diff"] = float((a.alpha - b.alpha).abs().max())
    out["mean_abs_alpha_diff"] = float((a.alpha - b.alpha).abs().mean())
    out["max_abs_rgb_diff"] = float((a.rgb - b.rgb).abs().max())
    out["gradient_cosine"] = float(torch.nn.functional.cosine_similarity(grads["torch"], grads["pytorch3d"], 0))
    out["gradient_norm_ratio"] = float(grads["pytorch3d"].norm() / grads["torch"].norm())
    print(json.dumps(out, indent=1), flush=True)
    for name in ("torch", "pytorch3d"):
        out[f"training_{name}"] = bench_meshhead(views, vertices, cfg.model_copy(update={"rasterizer": name}), dev,
                                                 steps)
        print(json.dumps(out[f"training_{name}"], indent=1), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", default="gaussian,knn,mesh")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mesh-steps", type=int, default=300)
    args = p.parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({"device": torch.cuda.get_device_name(), "torch": torch.__version__})
    stamp(result, "headavatar.bench.backends_gpu", argv)
    parts = args.parts.split(",")
    if "gaussian" in parts and installed("diff_gaussian_rasterization"):
        result["gaussian"] = gaussian_backends(args.frames, args.mesh_steps, args.steps)
        args.out.write_text(json.dumps(result, indent=1))
    if "knn" in parts and installed("simple_knn"):
        result["knn"] = knn_backends()
        args.out.write_text(json.dumps(result, indent=1))
    if "mesh" in parts and installed("pytorch3d"):
        result["mesh"] = mesh_backends(args.frames, args.steps)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

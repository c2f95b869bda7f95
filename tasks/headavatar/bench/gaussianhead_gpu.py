"""Stage 6 on a GPU: gsplat against the pure-PyTorch rasteriser, and training at the default profile.

1. Agreement and speed of the two rasterisers on the same random 32-channel scene (max abs image
   and alpha difference; forward + backward time).
2. One training step of the default profile (512 px splats -> 2048 px super-resolution) with each
   rasteriser: time and peak memory.
3. Held-out PSNR/SSIM of the synthetic head after ``--steps`` steps with gsplat.
Views are rendered in memory from the synthetic head; a short mesh-head run initialises the
Gaussians, as stage 5 would.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from headavatar.bench.training_gpu import synthetic_views
from headavatar.gaussianhead.model import GaussianHead, SuperResolution
from headavatar.gaussianhead.perceptual import Perceptual
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
from headavatar.render.gaussian_raster import GsplatRasterizer, Splats, TorchGaussianRasterizer
from headavatar.render.mesh_raster import build_mesh_rasterizer
from headavatar.settings import GaussianHeadConfig, MeshHeadConfig


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / repeats


def compare_rasterizers(n: int, size: int, channels: int) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    splats = Splats(*(t.to(dev) for t in (
        (torch.rand(n, 3, generator=g) - 0.5) * 0.25, torch.randn(n, 4, generator=g),
        torch.rand(n, 3, generator=g) * 0.002 + 0.0005, torch.rand(n, generator=g) * 0.9,
        torch.rand(n, channels, generator=g))))
    view = torch.eye(4, device=dev)
    view[2, 3] = 1.0
    f = size * 3.0
    k = torch.tensor([[f, 0, size / 2 - 0.5], [0, f, size / 2 - 0.5], [0, 0, 1]], device=dev)
    out, res = {}, {}
    for r in (TorchGaussianRasterizer(), GsplatRasterizer()):
        leaves = [t.clone().requires_grad_() for t in (splats.means, splats.quats, splats.scales, splats.opacities,
                                                        splats.colors)]

        def step(r=r, leaves=leaves) -> None:
            img, alpha = r(Splats(*leaves), view, k, size, size)
            (img.sum() + alpha.sum()).backward()

        torch.cuda.reset_peak_memory_stats()
        out[f"{r.name}_fwd_bwd_ms"] = round(timed(step, 10), 2)
        out[f"{r.name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        with torch.no_grad():
            res[r.name] = r(splats, view, k, size, size)
    out["max_abs_image_diff"] = float((res["torch"][0] - res["gsplat"][0]).abs().max())
    out["mean_abs_image_diff"] = float((res["torch"][0] - res["gsplat"][0]).abs().mean())
    out["max_abs_alpha_diff"] = float((res["torch"][1] - res["gsplat"][1]).abs().max())
    return {"gaussians": n, "size": size, "channels": channels, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--mesh-steps", type=int, default=300)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rasterizers": [compare_rasterizers(n, s, 32) for n, s in ((20_000, 512), (50_000, 1024))]}
    print(json.dumps(result, indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1))

    cfg = GaussianHeadConfig()
    workers = len(os.sched_getaffinity(0))
    coarse, verts = synthetic_views(args.frames, cfg.coarse_size, workers)
    fine, _ = synthetic_views(args.frames, cfg.fine_size, workers)
    mcfg = MeshHeadConfig(steps=args.mesh_steps, eval_every=0)
    mesh256, _ = synthetic_views(args.frames, mcfg.render_size, workers)
    mesh = init_model(mcfg, mesh256, verts)
    MeshHeadTrainer(mesh, mesh256, mcfg, build_mesh_rasterizer("torch", 0.5), dev).train(save=lambda _: None)
    with torch.no_grad():
        nv, _, _ = mesh.neutral()
        _, _, feats = mesh.query(nv)

    def trainer(raster, steps: int) -> GaussianHeadTrainer:
        torch.manual_seed(0)
        head = GaussianHead(cfg.model_copy(update={"steps": steps}), coarse.exp.shape[1], args.frames,
                            mesh.to_canonical(nv).cpu(), feats.cpu(), mesh.to_canonical(mesh.landmarks).detach().cpu(),
                            mesh.box_center.cpu(), float(mesh.box_half.max()))
        sr = SuperResolution(cfg.features, cfg.sr_channels, cfg.fine_size // cfg.coarse_size)
        c = cfg.model_copy(update={"steps": steps, "eval_every": 0, "checkpoint_every": 10**9})
        return GaussianHeadTrainer(head, sr, coarse, fine, c, raster, Perceptual(None), dev)

    steps_out = {}
    for r in (GsplatRasterizer(), TorchGaussianRasterizer()):
        t = trainer(r, 25)
        t.cfg = t.cfg.model_copy(update={"steps": 5})
        t.train(save=lambda _: None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t.cfg = t.cfg.model_copy(update={"steps": 25})
        t0 = time.perf_counter()
        t.train(save=lambda _: None)
        torch.cuda.synchronize()
        steps_out[r.name] = {"step_ms": round(1000 * (time.perf_counter() - t0) / 20, 1),
                             "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    result["train_step_default_profile"] = {"gaussians": len(t.head.xyz), "coarse": cfg.coarse_size,
                                            "fine": cfg.fine_size, **steps_out}
    print(json.dumps(result["train_step_default_profile"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1))

    t = trainer(GsplatRasterizer(), args.steps)
    before = t.evaluate()
    t0 = time.perf_counter()
    t.train(save=lambda _: None)
    result["training"] = {"steps": args.steps, "lr_net": cfg.lr_net, "seconds": round(time.perf_counter() - t0, 1),
                          "before": before, "after": t.state.evals[-1], "frames": args.frames,
                          "note": "held-out cameras 222200039, 222200044; masked image (black background)"}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["training"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

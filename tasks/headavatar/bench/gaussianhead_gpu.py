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
from dataclasses import dataclass
from pathlib import Path

import torch

from headavatar.bench.provenance import stamp
from headavatar.bench.training_gpu import synthetic_views
from headavatar.gaussianhead.model import GaussianHead, SuperResolution
from headavatar.gaussianhead.perceptual import Perceptual
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.meshhead.model import MeshHead
from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
from headavatar.render.gaussian_raster import GaussianRasterizer, GsplatRasterizer, Splats, TorchGaussianRasterizer
from headavatar.render.mesh_raster import build_mesh_rasterizer
from headavatar.settings import GaussianHeadConfig, MeshHeadConfig
from headavatar.training.views import Views


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / repeats


def random_scene(n: int, size: int, channels: int) -> tuple[Splats, torch.Tensor, torch.Tensor]:
    """Gaussians in front of a camera 1 unit away (dgr culls anything nearer than 0.2)."""
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
    return splats, view, k


def compare_rasterizers(n: int, size: int, channels: int, rasterizers: list[GaussianRasterizer]) -> dict:
    """Forward + backward time and peak memory of each; image and alpha differences to the first."""
    splats, view, k = random_scene(n, size, channels)
    out, res = {}, {}
    for r in rasterizers:
        leaves = [t.clone().requires_grad_() for t in (splats.means, splats.quats, splats.scales, splats.opacities,
                                                        splats.colors)]

        def step(r=r, leaves=leaves) -> None:
            img, alpha = r(Splats(*leaves), view, k, size, size)
            (img.sum() + alpha.sum()).backward()

        def step_image_only(r=r, leaves=leaves) -> None:
            img, _ = r(Splats(*leaves), view, k, size, size, with_alpha=False)
            img.sum().backward()

        torch.cuda.reset_peak_memory_stats()
        out[f"{r.name}_fwd_bwd_ms"] = round(timed(step, 10), 2)
        out[f"{r.name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out[f"{r.name}_image_only_fwd_bwd_ms"] = round(timed(step_image_only, 10), 2)
        with torch.no_grad():
            res[r.name] = r(splats, view, k, size, size)
    ref = rasterizers[0].name
    for name in list(res)[1:]:
        out[f"max_abs_image_diff_{name}_vs_{ref}"] = float((res[ref][0] - res[name][0]).abs().max())
        out[f"mean_abs_image_diff_{name}_vs_{ref}"] = float((res[ref][0] - res[name][0]).abs().mean())
        out[f"max_abs_alpha_diff_{name}_vs_{ref}"] = float((res[ref][1] - res[name][1]).abs().max())
    return {"gaussians": n, "size": size, "channels": channels, **out}


@dataclass
class TrainingSetup:
    """Stage-6 inputs as stage 5 would leave them: views at both resolutions and a trained mesh head."""

    cfg: GaussianHeadConfig
    frames: int
    coarse: Views
    fine: Views
    mesh: MeshHead
    neutral: torch.Tensor
    features: torch.Tensor

    @classmethod
    def build(cls, frames: int, mesh_steps: int) -> TrainingSetup:
        cfg, dev = GaussianHeadConfig(plateau_every=0), torch.device("cuda")
        workers = len(os.sched_getaffinity(0))
        coarse, verts = synthetic_views(frames, cfg.coarse_size, workers)
        fine, _ = synthetic_views(frames, cfg.fine_size, workers)
        mcfg = MeshHeadConfig(steps=mesh_steps, eval_every=0, plateau_every=0)
        mesh256, _ = synthetic_views(frames, mcfg.render_size, workers)
        mesh = init_model(mcfg, mesh256, verts)
        MeshHeadTrainer(mesh, mesh256, mcfg, build_mesh_rasterizer("torch", 0.5), dev).train(save=lambda _: None)
        with torch.no_grad():
            nv, _, _ = mesh.neutral()
            _, _, feats = mesh.query(nv)
        return cls(cfg, frames, coarse, fine, mesh, nv, feats)

    def trainer(self, raster: GaussianRasterizer, steps: int) -> GaussianHeadTrainer:
        cfg, mesh, nv = self.cfg, self.mesh, self.neutral
        torch.manual_seed(0)
        head = GaussianHead(cfg.model_copy(update={"steps": steps}), self.coarse.exp.shape[1], self.frames,
                            mesh.to_canonical(nv).cpu(), self.features.cpu(),
                            mesh.to_canonical(mesh.landmarks).detach().cpu(), mesh.box_center.cpu(),
                            float(mesh.box_half.max()))
        sr = SuperResolution(cfg.features, cfg.sr_channels, cfg.fine_size // cfg.coarse_size)
        c = cfg.model_copy(update={"steps": steps, "eval_every": 0, "checkpoint_every": 10**9})
        return GaussianHeadTrainer(head, sr, self.coarse, self.fine, c, raster, Perceptual(None), torch.device("cuda"))

    def time_step(self, raster: GaussianRasterizer, warm: int = 5, steps: int = 20) -> dict:
        """Mean step time and peak memory over ``steps`` training steps after ``warm`` warm-up steps."""
        t = self.trainer(raster, warm + steps)
        t.cfg = t.cfg.model_copy(update={"steps": warm})
        t.train(save=lambda _: None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t.cfg = t.cfg.model_copy(update={"steps": warm + steps})
        t0 = time.perf_counter()
        t.train(save=lambda _: None)
        torch.cuda.synchronize()
        return {"step_ms": round(1000 * (time.perf_counter() - t0) / steps, 1),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--mesh-steps", type=int, default=300)
    args = p.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rasterizers": [compare_rasterizers(n, s, 32, [TorchGaussianRasterizer(), GsplatRasterizer()])
                              for n, s in ((20_000, 512), (50_000, 1024))]}
    stamp(result, "headavatar.bench.gaussianhead_gpu", argv)
    print(json.dumps(result, indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1))

    setup = TrainingSetup.build(args.frames, args.mesh_steps)
    steps_out = {r.name: setup.time_step(r) for r in (GsplatRasterizer(), TorchGaussianRasterizer())}
    t = setup.trainer(GsplatRasterizer(), 1)
    cfg = setup.cfg
    result["train_step_default_profile"] = {"gaussians": len(t.head.xyz), "coarse": cfg.coarse_size,
                                            "fine": cfg.fine_size, **steps_out}
    print(json.dumps(result["train_step_default_profile"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1))

    t = setup.trainer(GsplatRasterizer(), args.steps)
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

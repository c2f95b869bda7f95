"""Issue 22, stage 5 on one GPU: mesh-head step time, host synchronisations, profile and quality, before
(``--role baseline``, run as a script against a checkout of the old code) and after (``--role new``).

``--role data`` renders the synthetic head once (16 cameras x ``--frames`` frames at the default 256 px,
true fit and exact matte standing in for stages 2-4); every role loads that file, so all see the same
views and seed. Per role and variant (``fp32`` and ``bf16`` with ``meshhead.compile`` off, ``bf16_compile``
= the new default): the mean step time (twice) over ``--steps`` steps through ``Trainer.train`` after
``--warm`` steps, peak memory, the host synchronisations a step makes (``torch.cuda`` sync debug mode,
by source line), a torch.profiler breakdown, and after ``--quality-steps`` steps from seed 0 the
held-out cameras' PSNR/SSIM (torchmetrics, protocol of ``gaussianhead.metrics``) and silhouette IoU.
Only APIs the old code also has are used in the baseline role.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def _sibling(name: str):
    """A module of this file's tree loaded by path (the baseline role's PYTHONPATH points at the old tree)."""
    spec = importlib.util.spec_from_file_location(f"new_{name}", HERE.parent / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_data(path: Path, frames: int) -> None:
    from headavatar.bench.training_gpu import synthetic_views
    from headavatar.settings import MeshHeadConfig

    views, verts = synthetic_views(frames, MeshHeadConfig().render_size, len(os.sched_getaffinity(0)))
    torch.save({"views": vars(views), "vertices": verts}, path)


def trainer(d: dict, precision: str, steps: int, compile_: bool = False):
    from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
    from headavatar.render.mesh_raster import build_mesh_rasterizer
    from headavatar.settings import MeshHeadConfig
    from headavatar.training.views import Views

    upd = {"steps": steps, "eval_every": 0, "precision": precision, "checkpoint_every": 10**9,
           "keep_checkpoint_every": 0}
    if "compile" in MeshHeadConfig.model_fields:  # the old code has no such setting (and compiles nothing)
        upd["compile"] = compile_
    cfg = MeshHeadConfig(plateau_every=0).model_copy(update=upd)
    views = Views(**d["views"])
    torch.manual_seed(0)
    model = init_model(cfg, views, d["vertices"])
    t = MeshHeadTrainer(model, views, cfg, build_mesh_rasterizer(cfg.rasterizer, cfg.edge_softness_px),
                        torch.device("cuda"))
    return t


def time_steps(t, warm: int, steps: int) -> dict:
    """Mean step time through ``Trainer.train`` (the loop's own log-step synchronisation included)."""
    t.evaluate = lambda: {}
    t.cfg = t.cfg.model_copy(update={"steps": t.state.step + warm})
    t.train(save=lambda _: None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t.cfg = t.cfg.model_copy(update={"steps": t.state.step + steps})
    t0 = time.perf_counter()
    t.train(save=lambda _: None)
    torch.cuda.synchronize()
    return {"step_ms": round(1000 * (time.perf_counter() - t0) / steps, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def one_step(t) -> None:
    loss, _ = t.step_loss()
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()


def syncs(t, steps: int) -> dict:
    """Host synchronisations per step that torch's sync debug mode reports, by source line."""
    one_step(t)
    torch.cuda.synchronize()
    where: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                one_step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {"per_step": round(sum(where.values()) / steps, 2),
            "by_line": {k: round(v / steps, 2) for k, v in where.most_common()}}


def quality(t, metrics) -> dict:
    """Held-out cameras, every frame: PSNR/SSIM of the render vs ground truth x matte (x visibility), IoU."""
    from headavatar.meshhead.trainer import render

    t.cfg = t.cfg.model_copy(update={"eval_every": 0})
    t0 = time.perf_counter()
    t.train(save=lambda _: None)
    seconds = time.perf_counter() - t0
    steady_ms = 1000 * t.state.step_seconds / max(t.state.timed_steps, 1)  # the loop leaves the first step out
    rows = []
    with torch.no_grad():
        for f in range(len(t.views.folders)):
            cams = torch.tensor(t.held_cams)
            b = t.batch(torch.full_like(cams, f), cams)
            r = render(t.model, t.raster, b, t.views.size)
            for i in range(len(cams)):
                vis, mask = b["visible"][i], b["mask"][i]
                gt = (b["image"][i] * mask[..., None]).permute(2, 0, 1) * vis
                pred = r.rgb[i].float().clamp(0, 1).permute(2, 0, 1) * vis
                rows.append(metrics.image_scores(pred, gt, mask * vis))
    return {"steps": t.cfg.steps, "train_seconds": round(seconds, 1), "step_ms_after_first": round(steady_ms, 2),
            **metrics.average(rows, "heldout"),
            "holdout_iou": round(t.silhouette_iou(t.held_cams), 5)}


def run_role(role: str, data: Path, out: Path, variants: list[str], warm: int, steps: int, quality_steps: int,
             quality_variants: list[str]) -> dict:
    prof = _sibling("speed_gpu")  # kernel families and the profiler wrapper
    metrics = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
        "new_metrics", HERE.parents[1] / "gaussianhead/metrics.py"))
    sys.modules["new_metrics"] = metrics
    spec.loader.exec_module(metrics)
    d = torch.load(data, weights_only=False)
    result: dict = {"role": role, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = out / f"meshhead_{role}.json"
    for name in variants:
        precision, compile_ = name.split("_")[0], name.endswith("_compile")
        r = result.setdefault(name, {})
        try:
            t = trainer(d, precision, quality_steps, compile_)
            if name in quality_variants:  # first, from the fresh seed-0 trainer (which compiles on its first step)
                r["quality"] = quality(t, metrics)
                print(role, name, "quality", json.dumps(r["quality"]), flush=True)
            else:
                t0 = time.perf_counter()
                one_step(t)
                torch.cuda.synchronize()
                r["first_step_s"] = round(time.perf_counter() - t0, 1)
            r["compile_failed_at"] = t.state.compile_failed_at
            r["step"] = time_steps(t, warm, steps)
            print(role, name, "step", r["step"], flush=True)
            r["step_again"] = time_steps(t, 5, steps)
            print(role, name, "step again", r["step_again"], flush=True)
            r["syncs"] = syncs(t, 5)
            print(role, name, "syncs/step", r["syncs"]["per_step"], json.dumps(r["syncs"]["by_line"]), flush=True)
            r["profile"] = prof.profile(lambda t=t: one_step(t), 10)
            print(role, name, "profile", json.dumps({k: v for k, v in r["profile"].items() if k != "top_kernels"}),
                  flush=True)
            if compile_:
                from torch._dynamo.utils import counters

                r["dynamo_stats"] = dict(counters["stats"])
                print(role, name, "dynamo", r["dynamo_stats"], flush=True)
        except Exception as e:
            r["error"] = repr(e)[-2000:]
            print(role, name, "FAILED", r["error"], flush=True)
        path.write_text(json.dumps(result, indent=1))
        t = None
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--role", choices=("data", "baseline", "new"), required=True)
    p.add_argument("--data", type=Path, default=Path("/tmp/meshhead_data.pt"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--variants", default="fp32,bf16")
    p.add_argument("--quality-variants", default="fp32,bf16")
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--quality-steps", type=int, default=600)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # a failed compile's trace
    args.out.mkdir(parents=True, exist_ok=True)
    if args.role == "data":
        make_data(args.data, args.frames)
        return 0
    split = [v for v in args.variants.split(",") if v]
    run_role(args.role, args.data, args.out, split, args.warm, args.steps, args.quality_steps,
             [v for v in args.quality_variants.split(",") if v])
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script against another checkout (PYTHONPATH decides the code)
        sys.path.pop(0)
    raise SystemExit(main())

"""Issue 22 on one GPU: stage 5/6 step time, profile and quality, before (``--role baseline``, run
against a checkout of the old code) and after (``--role new``), on the synthetic head.

``--role data`` renders the views once (16 cameras, ``--frames`` frames of the training sequence at
256/512/2048 px, and of a held-out sequence) and trains the stage-5 mesh head the Gaussians start
from; both roles then load that file, so before and after see the same data, mesh head and seed.
Per role and stage: mean step time over 20 steps after 5 warm-up steps, peak memory, a
torch.profiler breakdown of 10 steps by kernel family, and a quality run (held-out PSNR/SSIM every
``--eval-every`` steps with the training time so far: time to PSNR). Only APIs the old code also
has are used in the baseline role (this file runs there as a script: ``python path/to/speed_gpu.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
FAMILIES = (  # (family, substrings of kernel names), first match wins
    ("host-to-device copy", ("Memcpy HtoD",)),
    ("device-to-host copy", ("Memcpy DtoH",)),
    ("ssim (depthwise conv)", ("depthwise", "conv_depthwise", "DepthwiseConv")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "fprop", "dgrad",
                     "wgrad", "sm90_xmma", "nhwc", "nchw")),
    ("gsplat", ("rasterize", "projection", "isect", "gsplat", "intersect")),
    ("matmul", ("gemm", "cutlass", "ampere_", "sm80_", "sm90_", "nvjet")),
    ("optimizer", ("adam", "Adam", "multi_tensor")),
    ("reduction / scatter / sort", ("reduce", "scatter", "index", "sort", "Sort", "radix", "unique", "cumsum", "scan",
                                    "gather", "nonzero")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "Elementwise", "pointwise", "triton")),
)


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


SHAPED = ("aten::copy_", "aten::convolution_backward", "aten::convolution", "aten::clone")


def profile(step: Callable[[], None], steps: int, shapes: bool = False) -> dict:
    """GPU time per step by kernel family, and wall time per step, from torch.profiler; ``shapes``: also the
    device time of the ``SHAPED`` operators by input shape (which copies, which convolutions)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    fam: dict[str, float] = {}
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if dev and e.device_type == torch.autograd.DeviceType.CUDA:
            fam[family(e.key)] = fam.get(family(e.key), 0.0) + dev / 1000 / steps
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    gpu = sum(fam.values())
    out = {"wall_ms_per_step_profiled": round(1000 * wall, 2), "gpu_ms_per_step": round(gpu, 2),
           "gpu_idle_ms_per_step": round(max(0.0, 1000 * wall - gpu), 2),
           "by_family_ms": {k: round(v, 2) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
           "top_kernels": table.splitlines()}
    if shapes:
        out["by_shape"] = sorted(([e.key, str(e.input_shapes), round(e.device_time_total / 1000 / steps, 3),
                                   round(e.count / steps, 1)] for e in prof.key_averages(group_by_input_shape=True)
                                  if e.key in SHAPED), key=lambda r: -r[2])
    return out


def one_step(t) -> Callable[[], None]:
    """One optimisation step through the trainer's own methods (the old and the new code share them)."""
    def step() -> None:
        loss, _ = t.step_loss()
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.opt.step()
    return step


def repeated_steps(t, repeats: int, steps: int = 50, warm: int = 10) -> dict:
    """Step time through ``Trainer.train`` (so the loop's own synchronisation is included) in ``repeats``
    back-to-back runs of ``steps`` steps after ``warm``: the spread between runs, which one mean cannot
    show (two 20-step means on one H200 read 28.7 and 30.7 ms)."""
    done = t.state.step + warm  # a trainer timed before goes on from its step
    t.cfg = t.cfg.model_copy(update={"steps": done, "eval_every": 0, "checkpoint_every": 10**9})
    t.evaluate = lambda: {}
    t.train(save=lambda _: None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        done += steps
        t.cfg = t.cfg.model_copy(update={"steps": done})
        t0 = time.perf_counter()
        t.train(save=lambda _: None)
        torch.cuda.synchronize()
        runs.append(round(1000 * (time.perf_counter() - t0) / steps, 2))
    ordered = sorted(runs)
    return {"steps_per_run": steps, "warm_up_steps": warm, "runs_ms": runs, "median_ms": ordered[len(runs) // 2],
            "min_ms": ordered[0], "max_ms": ordered[-1],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def time_steps(t, warm: int = 5, steps: int = 20) -> dict:
    """Mean step time of ``steps`` steps after ``warm``, and the peak memory."""
    r = repeated_steps(t, 1, steps, warm)
    return {"step_ms": r["median_ms"], "peak_gpu_gib": r["peak_gpu_gib"]}


def curve(t, steps: int, eval_every: int) -> list[dict]:
    """Held-out scores every ``eval_every`` steps with the training seconds so far (evaluation time excluded)."""
    t.cfg = t.cfg.model_copy(update={"steps": steps, "eval_every": eval_every, "checkpoint_every": 10**9})
    evaluate = t.evaluate

    def timed_eval() -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {**evaluate(), "train_seconds": round(t.state.step_seconds, 2)}

    t.evaluate = timed_eval
    t.train(save=lambda _: None)
    t.evaluate = evaluate
    return t.state.evals


def time_to(points: list[dict], key: str, level: float) -> float | None:
    for p in points:
        if p.get(key, -1e9) >= level:
            return p["train_seconds"]
    return None


# --- data (new code) ------------------------------------------------------------------------------

def make_data(path: Path, frames: int, heldout_frames: int, mesh_steps: int, mesh_compile: bool = True) -> None:
    from headavatar.bench.training_gpu import synthetic_views
    from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
    from headavatar.render.mesh_raster import build_mesh_rasterizer
    from headavatar.settings import GaussianHeadConfig, MeshHeadConfig

    cfg, workers = GaussianHeadConfig(plateau_every=0), len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    coarse, verts = synthetic_views(frames, cfg.coarse_size, workers)
    fine, _ = synthetic_views(frames, cfg.fine_size, workers)
    mesh256, _ = synthetic_views(frames, MeshHeadConfig().render_size, workers)
    seq = "SEN-01-port_strong_smokey"
    h_coarse, _ = synthetic_views(heldout_frames, cfg.coarse_size, workers, sequence=seq)
    h_fine, _ = synthetic_views(heldout_frames, cfg.fine_size, workers, sequence=seq)
    render_s = time.perf_counter() - t0
    mcfg = MeshHeadConfig(steps=mesh_steps, eval_every=0, plateau_every=0, compile=mesh_compile)
    torch.manual_seed(0)
    mesh = init_model(mcfg, mesh256, verts)
    state = MeshHeadTrainer(mesh, mesh256, mcfg, build_mesh_rasterizer("torch", 0.5), torch.device("cuda")).train(
        save=lambda _: None)
    print("data: mesh head trained", mesh_steps, "steps, compile", mesh_compile, "compile_failed_at",
          state.compile_failed_at, flush=True)
    torch.save({"views": {k: vars(v) for k, v in (("coarse", coarse), ("fine", fine), ("mesh256", mesh256),
                                                     ("heldout_coarse", h_coarse), ("heldout_fine", h_fine))},
                "vertices": verts, "mesh": mesh.cpu().state_dict(), "mesh_config": mcfg.model_dump(mode="json"),
                "n_exp": int(coarse.exp.shape[1]), "heldout_sequence": seq, "render_seconds": render_s}, path)


def load_data(path: Path) -> dict:
    import dataclasses

    from headavatar.meshhead.model import MeshHead
    from headavatar.settings import MeshHeadConfig
    from headavatar.training.views import Views

    d = torch.load(path, weights_only=False)
    fields = {f.name for f in dataclasses.fields(Views)}  # the old code's Views may have fewer
    views = {k: Views(**{n: a for n, a in v.items() if n in fields}) for k, v in d["views"].items()}
    known = {k: v for k, v in d["mesh_config"].items() if k in MeshHeadConfig.model_fields}  # the old code's too
    mesh = MeshHead(MeshHeadConfig.model_validate(known), d["n_exp"], torch.zeros(3), torch.ones(3),
                    torch.ones(3), torch.zeros(68, 3))
    mesh.load_state_dict(d["mesh"])
    return {**d, "views": views, "mesh_model": mesh.cuda().eval()}


def gaussian_trainer(d: dict, steps: int, raster, role: str, precision: str = "bf16", heldout: bool = True,
                     compile: bool = False):
    from headavatar.gaussianhead.model import GaussianHead, SuperResolution
    from headavatar.gaussianhead.perceptual import Perceptual
    from headavatar.gaussianhead.trainer import GaussianHeadTrainer
    from headavatar.settings import GaussianHeadConfig

    v, mesh = d["views"], d["mesh_model"]
    upd = {"steps": steps, "eval_every": 0, "checkpoint_every": 10**9}
    if role == "new":
        upd["precision"] = precision
        if "compile" in GaussianHeadConfig.model_fields:
            upd["compile"] = compile
    cfg = GaussianHeadConfig(plateau_every=0).model_copy(update=upd)
    with torch.no_grad():
        nv, _, _ = mesh.neutral()
        _, _, feats = mesh.query(nv)
    torch.manual_seed(0)
    head = GaussianHead(cfg, v["coarse"].exp.shape[1], len(v["coarse"].folders), mesh.to_canonical(nv).cpu(),
                        feats.cpu(), mesh.to_canonical(mesh.landmarks).detach().cpu(), mesh.box_center.cpu(),
                        float(mesh.box_half.max()))
    sr = SuperResolution(cfg.features, cfg.sr_channels, cfg.fine_size // cfg.coarse_size)
    args = (head, sr, v["coarse"], v["fine"], cfg, raster, Perceptual(None), torch.device("cuda"))
    if role == "new":
        extra = [("self_reenactment", v["heldout_coarse"], v["heldout_fine"])] if heldout else []
        return GaussianHeadTrainer(*args, extra_eval=extra)
    return GaussianHeadTrainer(*args)


def mesh_trainer(d: dict, role: str, precision: str = "bf16", steps: int = 300):
    from headavatar.meshhead.trainer import MeshHeadTrainer, init_model
    from headavatar.render.mesh_raster import build_mesh_rasterizer
    from headavatar.settings import MeshHeadConfig

    upd = {"steps": steps, "eval_every": 0}
    if role == "new":
        upd["precision"] = precision
    cfg = MeshHeadConfig(plateau_every=0).model_copy(update=upd)
    torch.manual_seed(0)
    model = init_model(cfg, d["views"]["mesh256"], d["vertices"])
    return MeshHeadTrainer(model, d["views"]["mesh256"], cfg, build_mesh_rasterizer(cfg.rasterizer, 0.5),
                           torch.device("cuda"))


def protocol_scores(t, new_metrics) -> dict:
    """The new protocol's novel-view scores, computed on the old trainer's renders (same definition both sides)."""
    rows = []
    with torch.no_grad():
        for f in range(len(t.coarse.folders)):
            for c in t.held_cams:
                _, sr = t.render(f, c)
                b = t.fine.tensors(torch.tensor([f]), torch.tensor([c]), torch.device("cuda"))
                vis, mask = b["visible"][0], b["mask"][0]
                gt = (b["image"][0] * mask[..., None]).permute(2, 0, 1)
                rows.append(new_metrics.image_scores(sr.float().clamp(0, 1) * vis, gt * vis, mask * vis))
    return new_metrics.average(rows, "novel_view")


def with_heldout_sequence(t, d: dict) -> dict:
    """Add the held-out sequence (self-reenactment, every camera) to the trainer's evaluation sets; score all."""
    from headavatar.gaussianhead.metrics import PROTOCOL, EvalSet
    from headavatar.training.device_data import DeviceViews

    v = d["views"]
    cv, fv = DeviceViews(v["heldout_coarse"], t.device), DeviceViews(v["heldout_fine"], t.device)
    pairs = [(f, c) for f in range(len(cv.folders)) for c in range(len(cv.cameras))]
    t.eval_sets.append(EvalSet("self_reenactment", cv, fv, pairs, False, d["heldout_sequence"]))
    return {"protocol": PROTOCOL, **t.evaluate()}


def run_role(role: str, data: Path, out: Path, quality_steps: int, eval_every: int, long_steps: int,
             mesh_quality_steps: int, parts: set[str], repeats: int, throughput_variants: set[str]) -> None:
    from headavatar.render.gaussian_raster import GsplatRasterizer

    result: dict = {"role": role, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = out / f"speed_{role}.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    d = load_data(data)
    raster = GsplatRasterizer()
    if "mesh" in parts:
        m: dict = result.setdefault("meshhead", {})
        variants = ["fp32"] if role == "baseline" else ["fp32", "bf16"]
        for name in variants:
            t = mesh_trainer(d, role, name)
            m[f"step_{name}"] = time_steps(t)
            print(role, "meshhead", name, m[f"step_{name}"], flush=True)
            save()
        main = "fp32" if role == "baseline" else "bf16"
        t = mesh_trainer(d, role, main)
        m["profile"] = profile(one_step(t), 10)
        print(role, "meshhead profile", json.dumps({k: v for k, v in m["profile"].items() if k != "top_kernels"}),
              flush=True)
        t = mesh_trainer(d, role, main, mesh_quality_steps)
        iou0 = t.evaluate()["holdout_iou"]
        t0 = time.perf_counter()
        t.train(save=lambda _: None)
        m["quality"] = {"steps": mesh_quality_steps, "holdout_iou_initial": round(iou0, 4),
                        "holdout_iou_after": round(t.state.evals[-1]["holdout_iou"], 4),
                        "seconds": round(time.perf_counter() - t0, 1)}
        print(role, "meshhead quality", m["quality"], flush=True)
        save()
    if "gaussian_steady" in parts:  # the stage-6 step (bf16, channels-last SR), compiled (default) and not
        steady: dict = result.setdefault("gaussianhead_steady", {})
        for name, compile in (("bf16_compile", True), ("bf16_compile_losses_only", True), ("bf16", False)):
            t = gaussian_trainer(d, 25, raster, role, "bf16", heldout=False, compile=compile)
            if name == "bf16_compile_losses_only":  # super-resolution eager and channels-last, losses compiled
                t.sr.to(memory_format=torch.channels_last)
                losses = torch.compile(t.image_losses)
                t._view_losses = lambda img, c, f, t=t, losses=losses: losses(*t.super_resolve(img), c, f)
            t0 = time.perf_counter()
            try:
                steady[name] = {"channels_last": t.channels_last, **repeated_steps(t, repeats),
                                "seconds_incl_warm_up": round(time.perf_counter() - t0, 1)}
            except Exception as e:  # one variant failing must not cost the others (device time is scarce)
                steady[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                print(role, "gaussianhead steady", name, "FAILED", steady[name], flush=True)
                continue
            print(role, "gaussianhead steady", name, steady[name], flush=True)
            save()
            if name == "bf16_compile":
                steady[name]["profile"] = profile(one_step(t), 10)
                print(role, "gaussianhead profile", name, json.dumps(
                    {k: v for k, v in steady[name]["profile"].items() if k != "top_kernels"}), flush=True)
                save()
            del t
            torch.cuda.empty_cache()
    if "gaussian_throughput" in parts:  # issue 35.3: levers against the default step, and images/s by views_per_step
        chosen = tuple(v for v in THROUGHPUT_VARIANTS if not throughput_variants or v[0] in throughput_variants)
        gaussian_throughput(result.setdefault("gaussianhead_throughput", {}), d, raster, role, repeats, save, chosen)
    if "gaussian_quality" in parts:  # same seed, same steps: fp32 eager against the default (bf16 + compile)
        q: dict = result.setdefault("gaussianhead_quality", {})
        for name, precision, compile in (("fp32", "fp32", False), ("bf16_compile", "bf16", True)):
            t = gaussian_trainer(d, quality_steps, raster, role, precision, heldout=False, compile=compile)
            try:
                pts = curve(t, quality_steps, eval_every)
            except Exception as e:
                q[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                print(role, "gaussianhead quality", name, "FAILED", q[name], flush=True)
                continue
            q[name] = {"steps": quality_steps, "curve": pts, "final": pts[-1],
                       "step_ms": round(1000 * t.state.step_seconds / max(t.state.timed_steps, 1), 2)}
            print(role, "gaussianhead quality", name, json.dumps(pts[-1]), flush=True)
            save()
            del t
            torch.cuda.empty_cache()
    if "gaussian" in parts:
        g: dict = result.setdefault("gaussianhead", {})
        variants = ["fp32"] if role == "baseline" else ["fp32", "bf16", "bf16_channels_last"]
        for name in variants:
            t = gaussian_trainer(d, 25, raster, role, "fp32" if name == "fp32" else "bf16", heldout=False)
            if name.endswith("channels_last"):
                t.channels_last = True
                t.sr.to(memory_format=torch.channels_last)
            g[f"step_{name}"] = time_steps(t)
            print(role, "gaussianhead", name, g[f"step_{name}"], flush=True)
            save()
        main = "fp32" if role == "baseline" else "bf16"
        t = gaussian_trainer(d, 10**6, raster, role, main, heldout=False)
        g["profile"] = profile(one_step(t), 10)
        print(role, "gaussianhead profile", json.dumps({k: v for k, v in g["profile"].items() if k != "top_kernels"}),
              flush=True)
        save()
        del t
        torch.cuda.empty_cache()
        t = gaussian_trainer(d, quality_steps, raster, role, main, heldout=False)
        pts = curve(t, quality_steps, eval_every)
        if role == "baseline":
            spec = importlib.util.spec_from_file_location("new_metrics", HERE.parents[1] / "gaussianhead/metrics.py")
            assert spec and spec.loader
            new_metrics = importlib.util.module_from_spec(spec)
            sys.modules["new_metrics"] = new_metrics  # dataclasses look their module up there
            spec.loader.exec_module(new_metrics)
            final = protocol_scores(t, new_metrics)
        else:
            final = with_heldout_sequence(t, d)
        g["quality"] = {"steps": quality_steps, "eval_every": eval_every, "curve": pts, "final": final,
                        "minutes_to_30db": _minutes(time_to(pts, "holdout_psnr", 30.0)),
                        "minutes_to_35db": _minutes(time_to(pts, "holdout_psnr", 35.0))}
        print(role, "gaussianhead quality", json.dumps(pts[-1]), json.dumps(final), flush=True)
        save()
        if role == "new" and long_steps:
            del t
            torch.cuda.empty_cache()
            t = gaussian_trainer(d, long_steps, raster, role, main, heldout=False)
            pts = curve(t, long_steps, max(eval_every, long_steps // 12))
            g["long"] = {"steps": long_steps, "curve": pts, "final": with_heldout_sequence(t, d),
                         "minutes_to_30db": _minutes(time_to(pts, "holdout_psnr", 30.0)),
                         "minutes_to_35db": _minutes(time_to(pts, "holdout_psnr", 35.0)),
                         "minutes_to_40db": _minutes(time_to(pts, "holdout_psnr", 40.0))}
            print(role, "gaussianhead long", json.dumps(pts[-1]), json.dumps(g["long"]["final"]), flush=True)
            save()
            if "video" in parts:
                result["videos"] = videos(t, out)
                print(role, "videos", result["videos"], flush=True)
                save()
        del t
        torch.cuda.empty_cache()


THROUGHPUT_VARIANTS = (  # (name, perceptual.BLUR, perceptual.GRAD, Inductor options of super-resolution + losses,
    # views_per_step); options None: the trainer's own (trainer.COMPILE_OPTIONS). Against an older tree (role
    # baseline) GRAD does nothing: its SSIM has autograd's gradient only.
    ("bf16_compile_before", "conv", "autograd", {}, (1,)),  # before issue 35: SSIM's blur as cuDNN convolutions
    ("bf16_compile_shifts", "auto", "autograd", {}, (1,)),  # SSIM's blur as shifted sums (fused) when compiled
    ("bf16_compile", "auto", "autograd", None, (1, 2, 4)),  # the default: + channels-last forced (+ since 702a29f:
    # the pixel shuffle's gradient channels-last)
    ("bf16_compile_explicit_ssim", "auto", "explicit", None, (1,)),  # + SSIM's written-out gradient (not kept)
)  # CUDA graphs around super-resolution + losses ("triton.cudagraphs") were measured once and saved nothing
# (16.74 against 16.96 ms, H200): the GPU idles ~1 ms a step (stage6_throughput_gpu.json, call 1)


def gaussian_throughput(out: dict, d: dict, raster, role: str, repeats: int, save: Callable[[], None],
                        variants: tuple = THROUGHPUT_VARIANTS) -> None:
    """Step time (median of ``repeats`` runs of 50 steps) and images a second of compiled stage-6 variants,
    each at its ``views_per_step`` values (one trainer a variant, the first value warmed up with 10 steps,
    later ones with 5); a profile of each at one view a step."""
    from headavatar.gaussianhead import perceptual, trainer

    for name, blur, grad, options, per_step in variants:
        per_step = per_step[:1] if role == "baseline" else per_step  # the old code: its step time only
        torch._dynamo.reset()
        perceptual.BLUR, perceptual.GRAD = blur, grad
        entry: dict = out.setdefault(name, {"blur": blur, "ssim_grad": grad, "compile_options": trainer.COMPILE_OPTIONS
                                            if options is None else options})
        try:
            t = gaussian_trainer(d, 25, raster, role, "bf16", heldout=False, compile=True)
            if options is not None:
                t._view_losses = torch.compile(t.view_losses, options=options)
            t0 = time.perf_counter()
            for i, n in enumerate(per_step):
                t.cfg = t.cfg.model_copy(update={"views_per_step": n})
                r = repeated_steps(t, repeats, warm=10 if i == 0 else 5)
                r["images_per_s"] = round(1000 * n / r["median_ms"], 1)
                entry[f"views_{n}"] = r
                print(role, "gaussianhead throughput", name, n, r, flush=True)
                save()
            entry["seconds_incl_warm_up"] = round(time.perf_counter() - t0, 1)
            t.cfg = t.cfg.model_copy(update={"views_per_step": 1})
            entry["profile"] = profile(one_step(t), 10, shapes=True)
            print(role, "gaussianhead throughput profile", name, json.dumps(
                {k: v for k, v in entry["profile"].items() if k != "top_kernels"}), flush=True)
        except Exception as e:  # one variant failing must not cost the others (device time is scarce)
            entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(role, "gaussianhead throughput", name, "FAILED", entry["error"], flush=True)
        finally:
            perceptual.BLUR, perceptual.GRAD = "auto", "autograd"
        save()
        t = None
        torch.cuda.empty_cache()


def videos(t, out: Path) -> dict:
    from headavatar.avatar_video import reenactment_video, turntable_video

    heldout = next((s for s in t.eval_sets if s.name == "self_reenactment"), t.eval_sets[0])
    cam = t.held_cams[0]
    info = {}
    t0 = time.perf_counter()
    info["reenactment"] = reenactment_video(t, heldout, cam, out / "reenactment.mp4", fps=4)
    info["turntable"] = turntable_video(t, 0, cam, out / "turntable.mp4")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _minutes(s: float | None) -> float | None:
    return None if s is None else round(s / 60, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--role", choices=("data", "baseline", "new"), required=True)
    p.add_argument("--data", type=Path, default=Path("/tmp/speed_data.pt"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--heldout-frames", type=int, default=8)
    p.add_argument("--mesh-steps", type=int, default=300)
    p.add_argument("--quality-steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--long-steps", type=int, default=0)
    p.add_argument("--mesh-quality-steps", type=int, default=300)
    p.add_argument("--parts", default="gaussian,mesh",
                   help="comma-separated: gaussian, mesh, video (with --long-steps); new role only: "
                        "gaussian_steady, gaussian_quality (fp32 against bf16 + compile, --quality-steps), "
                        "gaussian_throughput (levers and images/s by views_per_step)")
    p.add_argument("--repeats", type=int, default=7, help="gaussian_steady: timings of 50 steps each")
    p.add_argument("--throughput-variants", default="", help="gaussian_throughput: these of THROUGHPUT_VARIANTS "
                   "(comma-separated names; default all)")
    p.add_argument("--mesh-compile", type=int, default=1, help="data role: train its mesh head compiled (1) or "
                   "eagerly (0: ~3 min less of device time; the data stay the same for every role)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # a failed compile's trace
    args.out.mkdir(parents=True, exist_ok=True)
    if args.role == "data":
        make_data(args.data, args.frames, args.heldout_frames, args.mesh_steps, bool(args.mesh_compile))
        return 0
    run_role(args.role, args.data, args.out, args.quality_steps, args.eval_every, args.long_steps,
             args.mesh_quality_steps, set(args.parts.split(",")), args.repeats,
             {v for v in args.throughput_variants.split(",") if v})
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script against another checkout (PYTHONPATH decides the code)
        sys.path.pop(0)
    raise SystemExit(main())

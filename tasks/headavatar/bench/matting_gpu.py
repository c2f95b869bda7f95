"""Throughput of the BackgroundMattingV2 network at 2048x2048 on a GPU (reference settings).

Random weights: the cost of MattingRefine does not depend on the weight values (the refiner
always refines ``refine_sample_pixels`` pixels in sampling mode), so frames per second are
representative without the (non-shippable) published checkpoint. Also reports how far the
fp16 matte is from the fp32 matte for the same input. Needs only torch and this package.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headavatar.bench.provenance import stamp
from headavatar.matting.bmv2 import MattingRefine


def measure(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype, iters: int) -> dict:
    dev = torch.device("cuda")
    src = torch.rand(batch, 3, size, size, device=dev, dtype=dtype)
    bgr = (src + 0.2 * torch.rand_like(src)).clamp(0, 1)
    model = model.to(dev, dtype)
    with torch.inference_mode():
        for _ in range(3):
            model(src, bgr)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(iters):
            model(src, bgr)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "fps": round(batch * iters / dt, 2),
            "ms_per_frame": round(1000 * dt / (batch * iters), 2),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtypes", default="float32,float16", help="comma-separated: float32, float16, bfloat16")
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = MattingRefine("resnet101", 0.25, "sampling", 80_000).eval()
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    runs = [measure(model, b, args.size, dt, args.iters) for dt in dtypes for b in map(int, args.batches.split(","))]
    # Lower precision vs fp32 on identical inputs (same weights): how much does it move the matte?
    dev = torch.device("cuda")
    src = torch.rand(2, 3, args.size, args.size, device=dev)
    bgr = (src + 0.2 * torch.rand_like(src)).clamp(0, 1)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
              "model": "MattingRefine resnet101, backbone_scale 0.25, sampling 80000 px", "runs": runs}
    with torch.inference_mode():
        a32 = model.to(dev, torch.float32)(src, bgr)[0]
        for dt in dtypes:
            if dt == torch.float32:
                continue
            diff = (a32 - model.to(dev, dt)(src.to(dt), bgr.to(dt))[0].float()).abs()
            name = "fp16" if dt == torch.float16 else str(dt).removeprefix("torch.")
            result[f"{name}_vs_fp32_alpha_abs_diff"] = {
                "max": round(diff.max().item(), 4), "mean": round(diff.mean().item(), 6),
                "pixels_over_1_level": round((diff > 1 / 255).float().mean().item(), 6)}
    stamp(result, "headavatar.bench.matting_gpu", argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

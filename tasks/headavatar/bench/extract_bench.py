"""``make bench``: stages 1+2 against the straightforward procedure and against decode-only.

On one synthetic capture (16 cameras x N frames at 2200x3208 by default), side by side in one
run on the same machine:

* ``decode_only``: every video decoded once with all cores, nothing else (the floor);
* ``ours``: ``headavatar run extract`` + ``headavatar run sample`` against the embedded S3
  server, including the raw download and all uploads;
* ``straightforward``: the reference procedure (decode all, crop/resize/write every 3rd frame at
  full size to local disk, copy every 10th folder), single process.

Each phase runs in its own process; its peak RSS is the largest resident set of that process,
its children, or (for stage 1) any camera worker. Results go to ``<out>/extract_sample.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

from headavatar.bench.provenance import stamp
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.layout import RAW
from headavatar.synthetic.capture import SyntheticSpec, write_capture

PHASE_RUNNER = (
    "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
    "print(json.dumps({'rc': r.returncode, 'seconds': dt, "
    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def phase(cmd: list[str], env: dict[str, str] | None = None, repeat: int = 1) -> dict:
    """Run ``cmd`` ``repeat`` times, each under a fresh parent that reports wall time and the peak
    RSS of its subtree; the median time counts (the runs are kept)."""
    runs = []
    for _ in range(repeat):
        r = subprocess.run([sys.executable, "-c", PHASE_RUNNER, *cmd], env={**os.environ, **(env or {})},
                           stdout=subprocess.PIPE, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if runs[-1]["rc"] != 0:
            raise RuntimeError(f"phase failed: {' '.join(cmd)}")
    return {"seconds": statistics.median(r["seconds"] for r in runs), "runs_s": [round(r["seconds"], 2) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def decode_only(raw: str, workers: int) -> None:
    """Decode every frame of every video once (no colour conversion), cameras in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    videos = sorted(str(p) for p in Path(raw).rglob("cam_*.mp4"))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)  # as stage 1 sets it
    with ProcessPoolExecutor(workers) as pool:
        frames = sum(pool.map(_decode_all, videos, [threads] * len(videos)))
    print(f"decoded {frames} frames from {len(videos)} videos")


def _decode_all(path: str, threads: int) -> int:
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    n = 0
    while cap.grab():
        n += 1
    return n


def straightforward(raw: str, out: str) -> None:
    """The reference procedure; on a v2 capture it colour-corrects every extracted frame and plate whole,
    before cropping (the dataset's order), with the same fast correction as stage 1 (so the speed-up
    measured is that of the pipeline's structure, not of the correction's implementation)."""
    from headavatar.bench.reference import reference_extract, reference_sample
    from headavatar.color import ColorCorrection, parse_color_calibration
    from headavatar.settings import load_config

    cfg = load_config()
    calib = Path(raw) / "v2" / "018" / "calibration" / "color_calibration.json"
    correct = None
    if calib.exists():
        fixes = {c: ColorCorrection(m) for c, m in parse_color_calibration(calib.read_bytes(), str(calib)).items()}
        correct = lambda image, cam: fixes[cam](image)  # noqa: E731
    reference_sample(reference_extract(Path(raw), "018", Path(out) / "extracted", cfg, correct), Path(out) / "sampled",
                     cfg)


def correction_cost(width: int, height: int, repeat: int = 7) -> dict:
    """CPU milliseconds of the v2 colour correction (3x3 matrix) per frame on one thread (CPU time, so that
    other load on the machine does not inflate it): on the source pixels a default crop keeps (what stage 1
    corrects) and on the whole frame (what the dataset's order corrects)."""
    from time import process_time

    import numpy as np

    from headavatar.color import ColorCorrection
    from headavatar.imaging import CropResize
    from headavatar.settings import ExtractConfig

    cv2.setNumThreads(1)
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cc = ColorCorrection(np.array([[1.1, 0.02, 0.01], [0.01, 1.05, 0.03], [0.02, 0.01, 1.15]]))
    crop = CropResize.from_config(ExtractConfig())
    out = {}
    cases = (("crop_region", lambda: crop.crop(frame, cc)), ("crop_without_correction", lambda: crop.crop(frame)),
             ("whole_frame", lambda: cc(frame)))
    for name, fn in cases:
        times = []
        for _ in range(repeat):
            t = process_time()
            fn()
            times.append(process_time() - t)
        out[f"{name}_ms"] = round(1000 * statistics.median(times), 1)
    out["correction_ms_per_frame"] = round(out["crop_region_ms"] - out["crop_without_correction_ms"], 1)
    cv2.setNumThreads(-1)
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "opencv": cv2.__version__, "os": platform.platform()}


def bench_capture(cache: Path, frames: int, width: int, height: int, noise: float, layout: str = "v1") -> Path:
    root = cache / f"capture-{frames}f-{width}x{height}-noise{noise:g}{'' if layout == 'v1' else '-' + layout}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_capture(SyntheticSpec("018", width=width, height=height, frames=frames, noise=noise, layout=layout),
                      root / RAW)
        (root / ".complete").touch()
    return root


def run(root: Path, frames: int, width: int, height: int, noise: float, cache: Path, repeat: int,
        layout: str = "v1") -> dict:
    raw = str(root / RAW)
    me = [sys.executable, "-m", "headavatar.bench.extract_bench"]
    cores = len(os.sched_getaffinity(0))
    result: dict = {"frames": frames, "cameras": 16, "width": width, "height": height, "noise": noise,
                    "layout": layout, "color_corrected": layout == "v2",
                    "video_mb": round(sum(p.stat().st_size for p in (root / RAW).rglob("*.mp4")) / 2**20, 1)}
    result["decode_only"] = phase([*me, "--phase", "decode", "--raw", raw, "--workers", str(cores)], repeat=repeat)

    with tempfile.TemporaryDirectory(prefix="bench-s3-", dir=cache) as s3dir, EmbeddedS3(Path(s3dir)) as s3:
        env = {**s3.env(), "HEADAVATAR_S3_BUCKET": "bench", "HEADAVATAR_S3_PREFIX": "bench"}
        s3.create_bucket("bench")
        from headavatar.settings import load_config
        from headavatar.storage import ObjectStore

        os.environ.update(env)
        store = ObjectStore(load_config().storage)
        store.upload_tree(root / RAW, store.key(RAW))
        cli = [sys.executable, "-m", "headavatar.cli", "run"]
        result["ours_extract"] = phase([*cli, "extract", "--capture", "018", "--force"], env, repeat)
        result["ours_sample"] = phase([*cli, "sample", "--capture", "018", "--force"], env, repeat)
        # Camera workers are forked by a server process the phase does not wait for: they report their own.
        extract = read_manifest(store, "018", "extract")
        store.close()
    result["ours"] = {"seconds": result["ours_extract"]["seconds"] + result["ours_sample"]["seconds"],
                      "peak_rss_mb": max(result["ours_extract"]["peak_rss_mb"], result["ours_sample"]["peak_rss_mb"],
                                         extract.metrics["worker_peak_rss_mb"])}

    with tempfile.TemporaryDirectory(prefix="bench-ref-", dir=cache) as out:
        result["straightforward"] = phase([*me, "--phase", "straightforward", "--raw", raw, "--dest", out],
                                          repeat=repeat)
    result["speedup_vs_straightforward"] = result["straightforward"]["seconds"] / result["ours"]["seconds"]
    result["ours_over_decode_only"] = result["ours"]["seconds"] / result["decode_only"]["seconds"]
    return result


def report(results: list[dict], out: Path, repeat: int, correction: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = stamp({"machine": machine(), "repeat": repeat, "runs": results, "color_correction": correction},
                "headavatar.bench.extract_bench")
    (out / "extract_sample.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# Stages 1+2 benchmark (`make bench`)", "",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['machine']['memory_gib']} GiB, "
        f"Python {doc['machine']['python']}, OpenCV {doc['machine']['opencv']}; {doc['date']}.", "",
        "| capture | video data | decode only | ours (extract + sample) | straightforward | speed-up | "
        "ours / decode | peak RSS ours | peak RSS straightforward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| 16 cams x {r['frames']} frames, {r['width']}x{r['height']}, noise {r['noise']:g}"
            f"{', v2 + colour correction' if r.get('color_corrected') else ''} | "
            f"{r['video_mb']} MB | {r['decode_only']['seconds']:.1f} s | "
            f"{r['ours']['seconds']:.1f} s ({r['ours_extract']['seconds']:.1f} + {r['ours_sample']['seconds']:.1f}) | "
            f"{r['straightforward']['seconds']:.1f} s | {r['speedup_vs_straightforward']:.2f}x | "
            f"{r['ours_over_decode_only']:.2f} | {r['ours']['peak_rss_mb']:.0f} MB | "
            f"{r['straightforward']['peak_rss_mb']:.0f} MB |")
    lines += ["", f"Each phase ran {repeat} time(s) in turn; the table shows the median (every run is in the .json).",
              "Targets: speed-up >= 3.5x, ours / decode <= 1.5. Peak RSS is per process (the largest single "
              "process of the phase, camera workers included); it stays flat as the number of frames grows.",
              "v2 rows: NeRSemble v2 layout with color_calibration.json applied (stage 1 corrects the source "
              "pixels the crop keeps; the straightforward procedure corrects whole frames first, with the same "
              "fast correction)."]
    if correction:
        lines += ["", f"Colour correction, CPU time on one thread, {correction['width']}x{correction['height']} "
                  "frame, 3x3 matrix: "
                  f"{correction['correction_ms_per_frame']} ms per frame on the pixels the crop keeps "
                  f"(crop with correction {correction['crop_region_ms']} ms, without "
                  f"{correction['crop_without_correction_ms']} ms); {correction['whole_frame_ms']} ms on the whole "
                  "frame."]
    (out / "extract_sample.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--runs", nargs="+", default=["90:2", "45:2", "90:0", "90:2:v2"],
                   help="FRAMES:NOISE[:LAYOUT] per capture (noise = sensor noise std in 8-bit levels; "
                        "LAYOUT v2 = NeRSemble v2 with colour calibration)")
    p.add_argument("--width", type=int, default=2200)
    p.add_argument("--height", type=int, default=3208)
    p.add_argument("--cache", type=Path, default=Path(".headavatar/bench"))
    p.add_argument("--repeat", type=int, default=1, help="runs per phase; the median counts")
    p.add_argument("--phase", choices=["decode", "straightforward"], help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "decode":
        decode_only(args.raw, args.workers)
        return 0
    if args.phase == "straightforward":
        straightforward(args.raw, args.dest)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    specs = [(int(r[0]), float(r[1]), r[2] if len(r) > 2 else "v1") for r in (x.split(":") for x in args.runs)]
    # Generate every capture first, so that nothing else runs while phases are timed.
    roots = [bench_capture(args.cache.resolve(), f, args.width, args.height, n, lay) for f, n, lay in specs]
    results = [run(root, f, args.width, args.height, n, args.cache.resolve(), args.repeat, lay)
               for root, (f, n, lay) in zip(roots, specs, strict=True)]
    correction = {"width": args.width, "height": args.height, **correction_cost(args.width, args.height)}
    report(results, args.out, args.repeat, correction)
    return 0


if __name__ == "__main__":
    sys.exit(main())

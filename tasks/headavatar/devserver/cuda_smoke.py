"""``make smoke-cuda``: the CUDA stage image, built here (``make images-cuda``), checked on a CPU machine.

Two checks, then a JSON line with what was seen:

1. inside ``headavatar/cuda``: torch is the CUDA pin's build (``images/requirements/torch-cuda.txt``),
   gsplat's compiled kernels (``gsplat.csrc``) load, and so do OpenCV, dlib and face_alignment; the image's
   size is printed with them;
2. ``make demo`` in a home of its own (``.headavatar/smoke-cuda``, 20 frames) with that image for stages
   3-6, run without a GPU request: the whole DAG succeeds, and each of stages 3-6 ran in a container of
   that image (the task logs say which image started).

Exit 0 when both hold, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from headavatar.devserver.common import REPO
from headavatar.devserver.images import cuda_image, torch_pin

GPU_STAGES = ("matting", "fitting", "meshhead", "gaussianhead")
PROBE = """
import json, cv2, dlib, face_alignment, torch, gsplat, gsplat.csrc
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gsplat": gsplat.__version__,
                  "kernels": gsplat.csrc.__file__, "cv2": cv2.__version__}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=cuda_image())
    parser.add_argument("--home", type=Path, default=REPO / ".headavatar" / "smoke-cuda")
    parser.add_argument("--out", type=Path, help="also write the result as a benchmark result (commit, date, machine)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    from headavatar.devserver import demo
    from headavatar.devserver.docker_engine import DockerEngine

    engine = DockerEngine(REPO / ".headavatar" / "docker").start()
    try:
        env = engine.env()
        size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", args.image], env=env,
                              capture_output=True, text=True)
        if size.returncode != 0:
            print(f"smoke-cuda: no image {args.image}: build it with make images-cuda", file=sys.stderr)
            return 1
        probe = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python",
                                args.image, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            print(f"smoke-cuda: torch, gsplat's kernels, cv2, dlib or face_alignment does not load in {args.image}: "
                  f"{probe.stderr[-1500:]}", file=sys.stderr)
            return 1
        inside = json.loads(probe.stdout.strip().splitlines()[-1])
        if not inside["torch"].startswith(torch_pin("torch-cuda.txt")) or not inside["cuda"]:
            print(f"smoke-cuda: {args.image} has torch {inside['torch']} (CUDA {inside['cuda']}), not the CUDA "
                  f"pin {torch_pin('torch-cuda.txt')}", file=sys.stderr)
            return 1
        rc = demo.main(["--home", str(args.home), "--frames", "20", "--stage-image", args.image])
        logs = sorted((args.home / "logs").glob("demo-*.log"))
        text = logs[-1].read_text(errors="replace") if logs else ""
        ran = {s for s in GPU_STAGES if re.search(rf"task_id={s}\b.*?Starting docker container from image "
                                                  rf"{re.escape(args.image)}", text, re.S)}
        if rc != 0 or ran != set(GPU_STAGES):
            print(f"smoke-cuda: the demo DAG on {args.image} exited {rc}; stages seen in that image: "
                  f"{sorted(ran)}; log {logs[-1] if logs else '-'}", file=sys.stderr)
            return 1
        summary = json.loads((args.home / "summary.json").read_text())
        result = {"image": args.image, "size_bytes": int(size.stdout.strip()), **inside,
                  "stages_in_image": sorted(ran), "seconds": round(time.monotonic() - t0, 1),
                  "demo_stages_s": summary["stages"], "holdout": summary["quality"],
                  "holdout_metrics": summary["metrics"]}
        if args.out:
            from headavatar.bench.provenance import stamp

            args.out.write_text(json.dumps(stamp(result, "headavatar.devserver.cuda_smoke", argv), indent=1) + "\n")
        print(json.dumps(result))
        return 0
    finally:
        engine.stop()  # only if this run started it


if __name__ == "__main__":
    sys.exit(main())

"""JOD of video pairs with ColorVideoVDP, run by the JOD environment's Python (``make jod``), not the project's.

    <.venv-jod>/bin/python jod_worker.py --display standard_4k --fps 73 DIR

``DIR`` holds, per pair i, ``test_<i>.u8`` and ``reference_<i>.u8`` (raw uint8 RGB, sRGB) and ``shape_<i>.json``
(frames, height, width, 3), as ``headavatar.jod.JodPairs`` writes them: raw bytes, nothing to unpickle.
Prints one JSON line: ``{"jod": [JOD of pair 0, pair 1, ...], "cvvdp": version, "display": name}``.
It imports numpy, torch and pycvvdp only: the project's packages are not installed in that environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pycvvdp
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--display", required=True, help="a cvvdp display model, e.g. standard_4k")
    ap.add_argument("--fps", type=float, required=True, help="frame rate of every video")
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    metric = pycvvdp.cvvdp(display_name=args.display, device=torch.device("cpu"), quiet=True)
    scores: list[float] = []
    pairs = len(list(args.folder.glob("shape_*.json")))
    for i in range(pairs):
        shape = json.loads((args.folder / f"shape_{i}.json").read_text())
        test, reference = (np.fromfile(args.folder / f"{name}_{i}.u8", dtype=np.uint8).reshape(shape)
                           for name in ("test", "reference"))
        with torch.no_grad():
            jod, _ = metric.predict(test, reference, dim_order="FHWC", frames_per_second=args.fps)
        scores.append(float(jod))
        print(f"JOD {i + 1}/{pairs}: {scores[-1]:.4f}", file=sys.stderr, flush=True)
    print(json.dumps({"jod": scores, "cvvdp": version("cvvdp"), "display": args.display}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

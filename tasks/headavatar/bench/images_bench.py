"""How long ``make images`` takes when nothing changed (warm) and after a code-only change.

The code-only change is made in a copy of the build context (one line appended to a module), so the
working tree is never touched; Docker's layer cache is shared, which is what a developer's next build
sees. The cold build (empty cache) is recorded from a first ``make images`` with ``--cold SECONDS``.
``python -m headavatar.bench.images_bench --out benchmarks/results [--cold 900]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from headavatar.bench.provenance import stamp
from headavatar.devserver.docker_engine import DockerEngine
from headavatar.devserver.images import REPO, build_images

CONTEXT = ("pyproject.toml", "README.md", ".dockerignore", "tasks", "config", "plugins", "images")


def code_only_context(dest: Path) -> Path:
    """A copy of the build context with one module changed (a comment line appended)."""
    for name in CONTEXT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    module = dest / "tasks" / "headavatar" / "errors.py"
    module.write_text(module.read_text() + f"\n# code-only change for the image build benchmark {time.time()}\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cold", type=float, default=None, help="seconds of a first build with an empty cache")
    args = parser.parse_args(argv)
    with DockerEngine(REPO / ".headavatar" / "docker") as engine:
        t = time.monotonic()
        warm_phases = build_images(env=engine.env())
        warm = time.monotonic() - t
        with tempfile.TemporaryDirectory() as tmp:
            context = code_only_context(Path(tmp))
            t = time.monotonic()
            code_phases = build_images(env=engine.env(), context=context)
            code_only = time.monotonic() - t
        build_images(env=engine.env())  # the tags back on the checkout's code (cached layers)
    result = stamp({"warm_s": round(warm, 1), "warm_phases_s": {k: round(v, 1) for k, v in warm_phases.items()},
                    "code_only_s": round(code_only, 1),
                    "code_only_phases_s": {k: round(v, 1) for k, v in code_phases.items()},
                    "cold_s": args.cold}, "headavatar.bench.images_bench", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

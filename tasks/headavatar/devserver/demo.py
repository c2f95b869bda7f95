"""``make demo``: the main job end to end on the embedded defaults, on a CPU-only machine.

Starts the embedded S3 server (SeaweedFS on 127.0.0.1, data under ``.headavatar/demo``), writes
a small synthetic capture for id 018, and runs every pipeline stage in order as a subprocess of
the same ``headavatar run`` command a container would run, with the ``demo`` config profile.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from headavatar.contract.outputs import RESERVED_PREFIX
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import build_stages
from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capture", default="018")
    parser.add_argument("--home", type=Path, default=Path(".headavatar/demo"))
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    home = args.home.resolve()
    server = EmbeddedS3(home / "s3")
    server.start()
    try:
        env = {**os.environ, **server.env(), "HEADAVATAR_S3_BUCKET": "headavatar", "HEADAVATAR_PROFILE": "demo"}
        cli = [sys.executable, "-m", "headavatar.cli"]  # synth creates the bucket if needed
        t0 = time.monotonic()
        subprocess.run([*cli, "synth", "--capture", args.capture, "--width", "256", "--height", "372",
                        "--frames", str(args.frames), "--sequence", "EXP-1-head", "--sequence", "EXP-2-eyes"],
                       env=env, check=True)
        results = {}
        for stage in build_stages():
            r = subprocess.run([*cli, "run", stage, "--capture", args.capture], env=env)
            if r.returncode != 0:
                log.error("stage %s failed (exit %d)", stage, r.returncode)
                return r.returncode
            results[stage] = "done"
        last = next(reversed([s for s, v in results.items() if v == "done"]))
        out = export(env, args.capture, last, home / "output" / args.capture)
        print(json.dumps({"capture": args.capture, "stages": results, "seconds": round(time.monotonic() - t0, 1),
                          "outputs": f"s3://headavatar/{load_config().storage.prefix}/avatars/{args.capture}/",
                          "local_copy_of_last_stage": str(out)}, indent=1))
    finally:
        server.stop()
    return 0


def export(env: dict[str, str], capture: str, stage: str, dest: Path) -> Path:
    """Copy a stage's outputs to a local folder so a person can look at them."""
    os.environ.update(env)
    store = ObjectStore(load_config().storage)
    prefix = store.key(stage_prefix(capture, stage))
    rels = ((o.key, o.key[len(prefix) + 1:]) for o in store.list(prefix))
    store.download_many((key, dest / rel) for key, rel in rels if not rel.startswith(RESERVED_PREFIX))
    store.close()
    return dest


if __name__ == "__main__":
    sys.exit(main())

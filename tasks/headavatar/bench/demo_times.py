"""``make demo`` on a fresh clone, timed: the first run (install, Docker engine, the stage images built cold,
the synthetic capture, the DAG) and a second one (everything cached), with each run's phases and stages and
the disk the demo leaves; then, with ``make demo-ui`` serving that state, the README's commands for it, in
order, each with its exit code and output. The demo's own estimate and the README's figures come from this
file, and tests/test_docs.py fails when the README's commands are no longer the ones run here.

    python -m headavatar.bench.demo_times --backend docker --out benchmarks/results/demo_times_docker.json

Run it on a quiet machine with no other Docker engine of the project running (the clone starts its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from headavatar.bench.provenance import stamp

REPO = Path(__file__).resolve().parents[3]


def _du_gib(path: Path) -> float:
    r = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return round(int(r.stdout.split()[0]) / 2**30, 2) if r.returncode == 0 and r.stdout else 0.0


def timed_demo(clone: Path, backend: str, log: Path) -> dict[str, Any]:
    """One ``make demo``: wall seconds of the whole command (install included) and the demo's own summary."""
    t = time.monotonic()
    with open(log, "ab") as f:
        subprocess.run(["make", "demo", f"BACKEND={backend}"], cwd=clone, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.monotonic() - t
    summary = json.loads((clone / ".headavatar" / "demo" / "summary.json").read_text())
    return {"make_demo_s": round(seconds, 1), "demo_s": summary["seconds"], "install_s": round(seconds - summary[
        "seconds"], 1), "phases_s": summary["phases"], "stages_s": summary["stages"],
            "cpu_workload_s": summary.get("cpu_workload_s")}  # this CPU's speed: the estimate scales by it


README_MARKER = "The CLI reads the demo's bucket"


def readme_commands(readme: str) -> list[str]:
    """The commands of the README's first ``bash`` block after :data:`README_MARKER`, comments dropped."""
    after = readme[readme.index(README_MARKER):]
    block = after[after.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def run_readme(clone: Path, log: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """``make demo-ui`` in the clone, and once it is ready, the README's commands in one shell, in order."""
    with open(log, "ab") as f:
        ui = subprocess.Popen(["make", "demo-ui"], cwd=clone, stdout=subprocess.PIPE, stderr=f, text=True,
                              start_new_session=True)
        try:
            assert ui.stdout is not None
            deadline = time.monotonic() + timeout
            for line in ui.stdout:
                f.write(line.encode())
                if line.startswith("Ready after") or time.monotonic() > deadline:
                    break
            done = []
            for cmd in readme_commands((clone / "README.md").read_text()):
                sourced = [d["command"] for d in done if d["command"].startswith("source ")]  # one shell's state
                script = "\n".join(["set -e", *sourced, cmd])
                r = subprocess.run(["bash", "-c", script], cwd=clone, capture_output=True, text=True, timeout=600)
                done.append({"command": cmd, "rc": r.returncode, "output": (r.stdout + r.stderr)[-1500:]})
            return done
        finally:
            os.killpg(ui.pid, signal.SIGINT)  # Ctrl-C, as a person stops it
            try:
                ui.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clone", type=Path, default=Path("/tmp/headavatar-demo-bench"))
    parser.add_argument("--backend", default="docker", choices=["docker", "local"])
    args = parser.parse_args(argv)
    if args.clone.exists():
        shutil.rmtree(args.clone)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(args.clone)], check=True)
    log = args.out.with_suffix(".log")
    first = timed_demo(args.clone, args.backend, log)
    later = timed_demo(args.clone, args.backend, log)
    disk = {"venv_gib": _du_gib(args.clone / ".venv"), "demo_home_gib": _du_gib(args.clone / ".headavatar" / "demo"),
            "docker_gib": _du_gib(args.clone / ".headavatar" / "docker")}
    readme = run_readme(args.clone, log)
    result = stamp({"backend": args.backend, "first": first, "later": later, "disk": disk, "readme": readme},
                   "headavatar.bench.demo_times", argv if argv is not None else sys.argv[1:])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

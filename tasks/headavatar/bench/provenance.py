"""Where a benchmark result came from: git commit, date, machine and command, stamped into every results file.

Numbers without their commit and machine go stale unnoticed; ``tests/test_benchmark_provenance.py``
checks that every file under ``benchmarks/results/`` carries these fields, and the docs print them
under every table generated from the file.

A GPU host gets the working tree without ``.git``: the commit is what the caller says
(``$HEADAVATAR_GIT_COMMIT``), and whether the tree held uncommitted changes cannot be seen there. So
every result also carries ``code_digest``, a digest of the package's Python sources when the result
was stamped (a run over several calls: its last call's), which ``python -m headavatar.bench.provenance
digest --commit REV`` computes for any commit to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FIELDS = ("commit", "date", "machine", "command")
PACKAGE = Path(__file__).resolve().parents[1]  # tasks/headavatar


def code_digest(package: Path = PACKAGE) -> str:
    """sha256 over the package's Python sources (relative path and bytes, in path order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def commit_digest(rev: str) -> str:
    """:func:`code_digest` of the package as commit ``rev`` has it (``git archive``)."""
    repo = PACKAGE.parents[1]
    sub = PACKAGE.relative_to(repo).as_posix()
    tar = subprocess.run(["git", "archive", "--format=tar", rev, sub], cwd=repo, capture_output=True)
    if tar.returncode:
        raise SystemExit(f"git archive {rev}: {tar.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as tf:
            tf.extractall(tmp, filter="data")
        return code_digest(Path(tmp) / sub)


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty): ``$HEADAVATAR_GIT_COMMIT`` where the tree travels without ``.git`` (a GPU host), else
    HEAD; dirty from ``git status`` where git can tell, None where it cannot."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        head = status = None
    known = head is not None and status is not None and head.returncode == 0 and status.returncode == 0
    commit = os.environ.get("HEADAVATAR_GIT_COMMIT") or (head.stdout.strip() if known else "unknown")
    return commit, bool(status.stdout.strip()) if known else None


def machine() -> dict[str, Any]:
    """CPU model, cores usable by this process, memory, OS, Python; the GPU when PyTorch is loaded and sees one."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo")
    mem_kb = next((int(ln.split()[1]) for ln in (meminfo.read_text().splitlines() if meminfo.exists() else [])
                   if ln.startswith("MemTotal")), 0)
    out: dict[str, Any] = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kb / 2**20, 1),
                           "os": platform.platform(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out.update({"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__, "cuda": torch.version.cuda})
    return out


def stamp(result: dict[str, Any], module: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Adds commit, dirty, the code's digest, date (UTC) and command to ``result``, and ``machine`` unless the
    writer recorded its own."""
    commit, dirty = git_commit()
    args = sys.argv[1:] if argv is None else argv
    result.update({"commit": commit, "dirty": dirty, "code_digest": code_digest(),
                   "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "command": " ".join(["python -m", module, *map(shlex.quote, args)])})
    result.setdefault("machine", machine())
    return result


def main(argv: list[str] | None = None) -> int:
    """``digest [--commit REV]``: the code digest of a commit (or of the sources here), to match a result's."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("action", choices=["digest"])
    ap.add_argument("--commit", help="a git revision (default: the sources as they are here, changes included)")
    args = ap.parse_args(argv)
    print(commit_digest(args.commit) if args.commit else code_digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())

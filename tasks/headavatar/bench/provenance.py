"""Where a benchmark result came from: git commit, date, machine and command, stamped into every results file.

Numbers without their commit and machine go stale unnoticed; ``tests/test_benchmark_provenance.py``
checks that every file under ``benchmarks/results/`` carries these fields, and the docs print them
under every table generated from the file.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FIELDS = ("commit", "date", "machine", "command")


def git_commit() -> tuple[str, bool]:
    """(commit, dirty): ``$HEADAVATAR_GIT_COMMIT`` where the tree travels without ``.git`` (a GPU host), else HEAD."""
    if os.environ.get("HEADAVATAR_GIT_COMMIT"):
        return os.environ["HEADAVATAR_GIT_COMMIT"], False
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", False
    if head.returncode:
        return "unknown", False
    return head.stdout.strip(), bool(status.stdout.strip())


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
    """Adds commit, dirty, date (UTC) and command to ``result``, and ``machine`` unless the writer recorded its own."""
    commit, dirty = git_commit()
    args = sys.argv[1:] if argv is None else argv
    result.update({"commit": commit, "dirty": dirty, "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "command": " ".join(["python -m", module, *map(shlex.quote, args)])})
    result.setdefault("machine", machine())
    return result

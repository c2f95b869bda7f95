"""Every benchmark result says where it came from: git commit, date, machine and command (issue 21, item 9)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

import pytest

from headavatar.bench.provenance import FIELDS, PACKAGE, code_digest, commit_digest, stamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def provenance_problems(doc: dict) -> list[str]:
    """What is missing or malformed among a results file's provenance fields."""
    problems = [f"no {k}" for k in FIELDS if not doc.get(k)]
    if doc.get("commit") and not re.fullmatch(r"[0-9a-f]{7,40}", str(doc["commit"])):
        problems.append(f"commit {doc['commit']!r} is not a git commit")
    if doc.get("date"):
        try:
            datetime.fromisoformat(str(doc["date"]).replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"date {doc['date']!r} is not ISO 8601")
    # Benchmarks, and the CUDA image's build and smoke test (their results: docs/containers.md).
    bench = r"headavatar\.bench\.|make bench|e2e_gpu\.sh|headavatar\.devserver\.(images|cuda_smoke)\b"
    if doc.get("command") and not re.search(bench, str(doc["command"])):
        problems.append(f"command {doc['command']!r} does not name a benchmark")
    return problems


def test_there_are_results() -> None:
    assert len(RESULTS) >= 5


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_file_has_provenance(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert provenance_problems(doc) == [], path.name
    if (ROOT / ".git").exists():  # the commit must be one of this repository's
        r = subprocess.run(["git", "cat-file", "-e", f"{doc['commit']}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert r.returncode == 0, f"{path.name}: commit {doc['commit']} not in this repository"


def test_checker_catches_missing_and_bad_fields() -> None:
    assert provenance_problems({"machine": {"cpu": "x"}}) == ["no commit", "no date", "no command"]
    bad = {"commit": "HEAD", "date": "yesterday", "machine": "m", "command": "python foo.py"}
    assert len(provenance_problems(bad)) == 3


def test_stamp_records_commit_date_machine_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADAVATAR_GIT_COMMIT", raising=False)
    doc = stamp({"runs": []}, "headavatar.bench.extract_bench", ["--repeat", "3", "--out", "a b"])
    assert provenance_problems(doc) == []
    assert doc["command"] == "python -m headavatar.bench.extract_bench --repeat 3 --out 'a b'"
    assert datetime.fromisoformat(doc["date"].replace("Z", "+00:00")).date() >= date(2026, 1, 1)
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["memory_gib"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert doc["commit"] == head
    kept = stamp({"machine": {"gpu": "given"}}, "headavatar.bench.e2e_gpu", [])
    assert kept["machine"] == {"gpu": "given"}  # a writer's own machine record wins


def test_stamp_takes_the_commit_from_the_environment_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADAVATAR_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    doc = stamp({}, "headavatar.bench.matting_gpu", [])
    assert doc["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert doc["code_digest"] == code_digest()


def test_the_code_digest_names_the_sources_that_ran(tmp_path: Path) -> None:
    """A result made from a tree without .git (a GPU host) records dirty as unknown and the digest of its
    sources, which matches the commit they came from; a changed or moved file gives another digest."""
    subprocess.run(["git", "archive", "--format=tar", "-o", str(tmp_path / "head.tar"), "HEAD", "tasks/headavatar"],
                   cwd=ROOT, check=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "head.tar"), "-C", str(tmp_path), "--strip-components=1"], check=True)
    copy = tmp_path / "headavatar"
    head = commit_digest("HEAD")
    assert code_digest(copy) == head
    clean = not subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "tasks/headavatar"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    assert (code_digest() == head) is clean  # the sources here are HEAD's exactly when none is changed

    # Stamped where the tree came without .git: the commit as told, dirty unknown, the copy's digest.
    stamped = subprocess.run(
        [sys.executable, "-c", "import json; from headavatar.bench.provenance import stamp; "
         "print(json.dumps(stamp({'machine': 'm'}, 'headavatar.bench.e2e_gpu', [])))"],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "HEADAVATAR_GIT_COMMIT": "0" * 40}, cwd=tmp_path,
        capture_output=True, text=True, check=True)
    doc = json.loads(stamped.stdout)
    assert (doc["commit"], doc["dirty"], doc["code_digest"]) == ("0" * 40, None, head)

    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "stale.py").write_text("compiled elsewhere")  # not a source
    assert code_digest(copy) == head
    loop = copy / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n")
    assert code_digest(copy) != head
    loop.write_text(loop.read_text()[:-1])
    loop.rename(copy / "loop.py")
    assert code_digest(copy) != head
    r = subprocess.run([sys.executable, "-m", "headavatar.bench.provenance", "digest", "--commit", "HEAD"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == head and PACKAGE.name == "headavatar"
    bad = subprocess.run([sys.executable, "-m", "headavatar.bench.provenance", "digest", "--commit", "no-such-rev"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("git archive no-such-rev: ")

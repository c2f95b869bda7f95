"""``headavatar costs``: the measured cost of a finished capture, from the usage its manifests record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, tiny_config, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3


@pytest.mark.slow
def test_costs_of_a_finished_capture(tiny_capture: Path, store: ObjectStore, s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    for stage in ("extract", "sample"):
        r = cli("run", stage, "--capture", "018", "--profile", "demo", env=s3_env)
        assert r.returncode == 0, r.stderr
    r = cli("costs", "--capture", "018", "--profile", "demo", "--json", env=s3_env)
    assert r.returncode == 0, r.stderr
    rows = {row["stage"]: row for row in json.loads(r.stdout)}
    assert list(rows) == ["extract", "sample", "total"]
    for stage in ("extract", "sample"):
        m = read_manifest(store, "018", stage)
        row = rows[stage]
        assert row["files"] == len(m.files)
        assert row["stored_mb"] == round(sum(f.size for f in m.files.values()) / 1e6, 1) > 0
        assert row["wall_s"] == m.wall_time_s
        assert row["cpu_s"] > 0 and 10 < row["peak_rss_mb"] < 4096  # a real process's numbers
        assert row["scratch_mb"] >= 0 and row["gpu_s"] is None  # no CUDA here
    # Stage 1's camera workers are forked by a server process: their CPU time counts through worker_cpu_s.
    extract = read_manifest(store, "018", "extract").metrics
    assert extract["worker_cpu_s"] > 0 and extract["cpu_s"] >= extract["worker_cpu_s"]
    assert rows["total"]["files"] == rows["extract"]["files"] + rows["sample"]["files"]
    assert rows["total"]["peak_rss_mb"] == max(rows["extract"]["peak_rss_mb"], rows["sample"]["peak_rss_mb"])

    table = cli("costs", "--capture", "018", "--profile", "demo", env=s3_env)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["stage", "wall", "s"]
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == ["extract", "sample", "total"]


def test_costs_of_an_unknown_capture_is_one_line(s3_env: dict[str, str]) -> None:
    ObjectStore(tiny_config().storage).ensure_bucket()
    r = cli("costs", "--capture", "999", "--profile", "demo", env=s3_env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: no finished stage for capture 999 (no manifest under avatars/999/)"]
    bad = cli("costs", "--capture", "../018", env=s3_env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")

"""The README's set-up figures and its commands for the demo's state are the ones measured on a fresh clone
(``python -m headavatar.bench.demo_times``, which runs ``make demo`` twice and then those commands with
``make demo-ui`` serving the result): a README edit that is not re-measured fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from headavatar.bench.demo_times import readme_commands
from headavatar.stages import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MEASURED = json.loads((ROOT / "benchmarks" / "results" / "demo_times_docker.json").read_text())


def test_the_readme_commands_ran_as_written_on_the_demo_state() -> None:
    ran = MEASURED["readme"]
    assert [c["command"] for c in ran] == readme_commands(README), "README changed: rerun headavatar.bench.demo_times"
    assert [c["rc"] for c in ran] == [0] * len(ran), ran
    status = next(c["output"] for c in ran if " status " in c["command"])
    for stage in STAGE_NAMES:
        assert re.search(rf"^{stage}\s+done ", status, re.M), status


def test_the_readme_times_and_disk_are_the_measured_ones() -> None:
    first, later, disk = MEASURED["first"], MEASURED["later"], MEASURED["disk"]
    assert f"the first `make demo` about {round(first['make_demo_s'] / 60)} minutes" in README
    assert f"install {round(first['install_s'] / 60)} min" in README
    makefile = (ROOT / "Makefile").read_text()  # what `make install` says it will take
    assert f"with its dependencies (about {round(first['install_s'] / 60)} min)" in makefile
    assert f"a second one {round(later['make_demo_s'])} s" in README
    assert f"about {sum(disk.values()):.1f} GiB of disk" in README
    assert MEASURED["commit"][:8] in README  # which code was measured


def test_the_estimate_scales_by_the_workload_only_on_the_cpu_model_it_was_measured_on() -> None:
    from headavatar.devserver.demo import scaled_estimate

    cpu, there = MEASURED["machine"]["cpu"], MEASURED["first"]["cpu_workload_s"]
    minutes = f"{int(MEASURED['first']['demo_s'] * 2 // 60)} min"
    assert f"About {minutes}" in scaled_estimate(MEASURED, True, 2 * there, cpu)
    assert "x2.00 for this CPU's speed" in scaled_estimate(MEASURED, True, 2 * there, cpu)
    other = scaled_estimate(MEASURED, True, 2 * there, "another CPU model")
    assert f"About {int(MEASURED['first']['demo_s'] // 60)} min" in other and f"on {cpu}" in other
    assert "for this CPU's speed" not in other
    unrecorded = {k: v for k, v in MEASURED.items() if k != "machine"}  # no CPU to compare: not scaled
    assert "an unrecorded CPU" in scaled_estimate(unrecorded, True, 2 * there, "")

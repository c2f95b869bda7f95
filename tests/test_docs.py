"""The docs site builds with warnings as errors, and its numbers come from the results files, not from copies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import hooks  # noqa: E402  (docs/hooks.py, the MkDocs hook)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_benchmark_tables_are_generated_from_the_results(site: Path) -> None:
    e2e = json.loads((ROOT / "benchmarks" / "results" / "e2e_gpu.json").read_text())
    page = (site / "stages" / "index.html").read_text()
    psnr = e2e["stages"]["gaussianhead"]["metrics"]["holdout_psnr"]
    assert f"PSNR {psnr:.1f} dB" in page
    assert e2e["commit"][:10] in page  # provenance under the table
    bench = (site / "benchmarks" / "index.html").read_text()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"{path.stem}.json" in bench
        assert json.loads(path.read_text())["commit"][:10] in bench


def test_reference_and_generated_pages_are_in_the_site(site: Path) -> None:
    ref = (site / "reference" / "configuration" / "index.html").read_text()
    assert "meshhead.steps" in ref and "gaussianhead.lpips_weights" in ref
    assert "<code>headavatar config</code>" in (site / "reference" / "cli" / "index.html").read_text()
    assert "GPU-hours / day" in (site / "capacity" / "index.html").read_text()
    assert "<!-- bench" not in (site / "stages" / "matting" / "index.html").read_text()


def test_a_marker_naming_a_missing_results_file_fails() -> None:
    with pytest.raises(FileNotFoundError):
        hooks.expand("bench", "no_such_benchmark")
    with pytest.raises(ValueError):
        hooks.expand("settings", "no_such_section")


def test_pages_not_written_yet_leave_the_nav_and_their_links_become_text(tmp_path: Path) -> None:
    (tmp_path / "index.md").write_text("# x\n")
    hooks.MISSING.clear()
    nav = [{"Overview": "index.md"}, {"Ops": ["ops.md", {"Later": "later.md"}]}, "gone.md"]
    assert hooks._prune(nav, tmp_path) == [{"Overview": "index.md"}]
    assert sorted(hooks.MISSING) == ["gone.md", "later.md", "ops.md"]
    text = hooks.on_page_markdown("See [later](later.md#a) and [home](index.md).", None, None, None)
    assert text == "See later and [home](index.md)."
    hooks.MISSING.clear()


def test_capacity_plan_follows_the_measurements() -> None:
    """The plan uses the whole capture at real size (docs/gpu.md's run 2): its per-image stage costs and
    memory, and its stage-5 and stage-6 rates at the default step counts."""
    from headavatar.bench import capacity
    from headavatar.settings import GaussianHeadConfig, MeshHeadConfig

    results = ROOT / "benchmarks" / "results"
    real = json.loads((results / "e2e_real_size_gpu.json").read_text())["stages"]
    costs = {c.stage: c for c in capacity.stage_costs(100)}
    assert real["matting"]["metrics"]["images"] == 224  # 14 kept frames x 16 cameras: 1600 / 224 below
    assert costs["extract"].seconds == pytest.approx(real["extract"]["wall_s"] * 1600 / 224)
    assert costs["fitting"].stored_gb == pytest.approx(real["fitting"]["metrics"]["bytes"] * 1600 / 224 / 1e9)
    mesh = real["meshhead"]
    steps5 = MeshHeadConfig().steps
    assert costs["meshhead"].seconds == pytest.approx(mesh["wall_s"] * steps5 / mesh["metrics"]["steps"])
    log = real["gaussianhead"]["from_the_log"]
    start = log["stage_start_to_step_1_s"] - log["gsplat_extension_build_s"]  # the CUDA image builds gsplat
    assert costs["gaussianhead"].seconds == pytest.approx(
        GaussianHeadConfig().steps * log["ms_per_step_10000_to_15000"] / 1000 + start)
    assert costs["gaussianhead"].peak_gpu_gib == pytest.approx(real["gaussianhead"]["peak_gpu_mib"] / 1024)
    gpu_md = (ROOT / "docs" / "gpu.md").read_text()
    assert f"at 25.2 steps/s ({1000 / mesh['metrics']['train_steps_per_s']:.2f} ms a step)" in gpu_md
    one, many = capacity.plan(1, 100), capacity.plan(40, 100)
    assert many["gpu_hours_per_day"] == pytest.approx(40 * one["gpu_hours_per_day"])
    assert many["gpus"] == -(-40 * one["gpu_s_per_capture"] // (86_400 * capacity.GPU_UTILISATION))
    assert many["stored_tb_per_day"] == pytest.approx(40 * one["stored_gb_per_capture"] / 1000)


def results_numbers() -> list[float]:
    """Every number in benchmarks/results/*.json (values, and numbers written inside strings)."""
    found: list[float] = []

    def walk(x: object) -> None:
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            found.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            found.extend(float(m) for m in re.findall(r"\d+(?:\.\d+)?", x))

    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        walk(json.loads(path.read_text()))
    return found


MEASURED = re.compile(r"(\d+(?:\.\d+)?)(?:[-\u2013](\d+(?:\.\d+)?))? (ms|GiB|dB|frames/s|steps/s|images/s)\b")


@pytest.mark.parametrize("page", ["gpu.md", "capacity.md", "development.md", "containers.md", "stages/*.md"])
def test_measured_figures_in_the_docs_come_from_results_files(page: str) -> None:
    """Every time, memory, quality and rate figure on the pages that report measurements is a number of a
    results file (as written there, rounded to the digits the page shows): a figure typed in by hand, or
    left behind when its results file was re-measured, fails with its page and text."""
    numbers = results_numbers()
    missing = []
    for path in sorted((ROOT / "docs").glob(page)):
        for m in MEASURED.finditer(path.read_text()):
            for figure in filter(None, m.groups()[:2]):
                digits = len(figure.partition(".")[2])
                if not any(abs(n - float(figure)) <= 0.5 * 10 ** -digits + 1e-9 for n in numbers):
                    missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not missing, missing


def test_the_docs_name_every_dag_and_count_them_right() -> None:
    dag_ids = sorted(re.findall(r'(?<!_)dag_id="(\w+)"', "".join(p.read_text() for p in (ROOT / "dags").glob("*.py"))))
    assert len(dag_ids) == 3, dag_ids
    layout = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("dags/"))
    assert sorted(re.findall(r"headavatar_\w+", layout)) == dag_ids, layout
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    row = next(ln for ln in architecture.splitlines() if ln.startswith("| orchestration |"))
    assert "three Airflow 3 DAGs" in row and sorted(re.findall(r"`(headavatar_\w+)`", row)) == dag_ids, row
    counted = re.findall(r"\b(one|two|three|four|five|\d+) (?:Airflow (?:3 )?)?DAGs\b", " ".join(
        p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]))
    assert set(counted) <= {"three", "3"}, counted


def test_the_detector_choice_quotes_its_results_file() -> None:
    """Every percentage in docs/stages/fitting.md's "Why dlib is the default" is a share in
    benchmarks/results/landmark_detectors.json (times 100, as rounded on the page)."""
    text = (ROOT / "docs" / "stages" / "fitting.md").read_text()
    section = text.split("### Why dlib is the default", 1)[1].split("\n## ", 1)[0]
    shares: list[float] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, float) and 0 <= x <= 1:
            shares.append(100 * x)

    walk(json.loads((ROOT / "benchmarks" / "results" / "landmark_detectors.json").read_text()))
    quoted = re.findall(r"(\d+(?:\.\d+)?) ?%", section)
    assert len(quoted) >= 8, quoted
    missing = [q for q in quoted if not any(abs(s - float(q)) <= 0.5 for s in shares)]
    assert not missing, missing

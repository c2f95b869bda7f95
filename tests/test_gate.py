"""The test gate (tests/gate.py) fails a session in which a test did not run, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)
TESTS = Path(__file__).resolve().parent
SUITE = """
import pytest

def test_runs():
    pass

def test_skipped():
    pytest.skip("no such tool")

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False

@pytest.mark.slow
def test_slow():
    pass
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gate: str, *args: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\ntestpaths = tests\nmarkers =\n    slow: slow\n")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_suite.py").write_text(SUITE)
    monkeypatch.setenv("HEADAVATAR_TEST_GATE", gate)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    return pytester.runpytest_subprocess("-p", "gate", *args)


def test_under_the_gate_a_skip_an_xfail_and_a_deselected_test_fail_with_their_names(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, "1", "-m", "not slow")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*this one did not run: Skipped: no such tool", "*this one did not run: known",
                                 "FAILED tests/test_suite.py::test_skipped*",
                                 "FAILED tests/test_suite.py::test_expected_to_fail*"])
    result.stderr.fnmatch_lines(["TEST GATE: these tests did not run:", "*tests/test_suite.py::test_slow (deselected)"])


def test_under_the_gate_a_run_of_some_paths_is_refused(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, "1", "tests/test_suite.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the test gate runs the whole suite*"])


def test_without_the_gate_skips_stay_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, "0", "-m", "not slow")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1, xfailed=1, deselected=1)

"""The test gate, a pytest plugin (``-p gate`` in pyproject.toml): under CI (``CI=true``) or
``HEADAVATAR_TEST_GATE=1`` every test in the repository runs, and a test that did not run fails the
session with its name: a skip (a missing tool, a skip marker, a module skipped whole), an xfail, a
test deselected by ``-m``/``-k``/``--deselect``, or a run narrowed to some paths. Whatever the mode,
tests that start Docker, Airflow, MLflow or a browser are marked ``slow`` by the fixtures they use, so
``-m "not slow"`` (``make test-fast``) leaves them out."""

from __future__ import annotations

import os
import sys

import pytest

SLOW_FIXTURES = {"docker_env", "airflow_home", "airflow", "stack", "page", "mlflow_server"}
_not_run: list[str] = []


def gate_on() -> bool:
    return os.environ.get("HEADAVATAR_TEST_GATE", "1" if os.environ.get("CI") == "true" else "0") == "1"


@pytest.hookimpl(tryfirst=True)  # before -m deselects on the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if gate_on() and config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        raise pytest.UsageError(f"the test gate runs the whole suite, not some paths: {config.args}")


def pytest_deselected(items: list[pytest.Item]) -> None:
    if gate_on():
        _not_run.extend(f"{item.nodeid} (deselected)" for item in items)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if gate_on() and report.skipped:
        _not_run.append(f"{report.nodeid} (skipped whole: {report.longrepr[-1]})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if gate_on() and (report.skipped or hasattr(report, "wasxfail")):
        reason = getattr(report, "wasxfail", "") or (report.longrepr[-1] if isinstance(report.longrepr, tuple) else "")
        report.outcome = "failed"
        report.longrepr = f"the test gate runs every test, and this one did not run: {reason}"
        if hasattr(report, "wasxfail"):
            del report.wasxfail


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _not_run:
        print("\nTEST GATE: these tests did not run:\n  " + "\n  ".join(_not_run), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Re-running from a stage in a DAG run triggered without a logical date (how the UI, the REST API
and the ingestion DAG trigger runs in Airflow 3), on a real Airflow: API server, scheduler, DAG
processor and LocalExecutor (SQLite), as an operator would drive it (docs/operations-rerun.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import upload_capture
from headavatar.contract.manifest import Manifest
from headavatar.contract.stage import manifest_key, read_manifest
from headavatar.settings import deep_merge
from headavatar.storage import ObjectStore
from test_airflow import REPO, _env

pytestmark = [pytest.mark.s3, pytest.mark.slow]
DAG = "headavatar_capture"
STAGES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
CONF = {"id": "018", "profile": "rerun", "meshhead_steps": 10, "gaussianhead_steps": 10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Airflow:
    """API server + scheduler + DAG processor of one Airflow home; REST calls as an operator makes them."""

    def __init__(self, home: Path, env: dict[str, str]):
        import httpx

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "2",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"}
        self.home = home
        self.procs: list[subprocess.Popen] = []
        self.http = httpx.Client(base_url=f"{self.url}/api/v2", timeout=60)
        self._port = port

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True,
                              timeout=300)

    def start(self) -> Airflow:
        r = self.cli("db", "migrate")
        assert r.returncode == 0, r.stderr[-2000:]
        assert self.cli("pools", "set", "headavatar_gpu", "1", "GPU stages").returncode == 0
        for cmd in (["api-server", "--host", "127.0.0.1", "--port", str(self._port), "--workers", "1"],
                    ["scheduler"], ["dag-processor"]):
            log = open(self.home / f"{cmd[0]}.log", "w")  # noqa: SIM115 (closed with the process)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "airflow", *cmd], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if self.http.get(f"/dags/{DAG}").status_code == 200:  # parsed; unpaused (only this DAG)
                    assert self.http.patch(f"/dags/{DAG}", json={"is_paused": False}).status_code == 200
                    return self
            except Exception:  # not listening yet
                pass
            assert all(p.poll() is None for p in self.procs), self.logs()
            time.sleep(2)
        raise AssertionError("Airflow did not come up / parse the DAG:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='ignore')[-3000:]}" for p in self.home.glob("*.log"))

    def stop(self) -> None:
        for p in self.procs:  # only what this fixture started, by process group
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.http.close()

    def wait_run(self, run_id: str, timeout: float = 2400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.http.get(f"/dags/{DAG}/dagRuns/{run_id}").json()
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(3)
        raise AssertionError(f"run {run_id} did not finish: {self.tis(run_id)}\n{self.logs()}")

    def tis(self, run_id: str) -> dict[str, dict]:
        r = self.http.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances")
        return {t["task_id"]: t for t in r.json()["task_instances"]}

    def task_log(self, run_id: str, task: str, attempt: int) -> str:
        path = self.home / "logs" / f"dag_id={DAG}" / f"run_id={run_id}" / f"task_id={task}" / f"attempt={attempt}.log"
        return path.read_text(errors="ignore")


def _config_dir(root: Path) -> Path:
    """The repository's config plus profile ``rerun``: the demo profile with a shorter 3DMM fit (CPU time)."""
    (root / "profiles").mkdir(parents=True)
    (root / "pipeline.yaml").write_text((REPO / "config" / "pipeline.yaml").read_text())
    demo = yaml.safe_load((REPO / "config" / "profiles" / "demo.yaml").read_text())
    rerun = deep_merge(demo, {"fitting": {"pose_steps": 200, "all_steps": 400}})
    (root / "profiles" / "rerun.yaml").write_text(yaml.safe_dump(rerun))
    return root


@pytest.fixture
def airflow(tmp_path: Path, s3_env: dict[str, str]) -> Iterator[Airflow]:
    home = tmp_path / "airflow"
    home.mkdir()
    env = _env(home, s3_env)
    env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] = str(home / "logs")
    env["HEADAVATAR_CONFIG_DIR"] = str(_config_dir(tmp_path / "config"))
    af = Airflow(home, env).start()
    try:
        yield af
    finally:
        af.stop()


def _done(store: ObjectStore) -> dict[str, Manifest]:
    return {s: read_manifest(store, "018", s) for s in STAGES}


@pytest.mark.timeout(3600)  # two DAG runs' worth of stages on a shared 2-core machine
def test_clear_matting_with_downstream_in_a_run_without_logical_date(
        airflow: Airflow, store: ObjectStore, tiny_capture: Path) -> None:
    upload_capture(store, tiny_capture)
    r = airflow.http.post(f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": CONF})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert r.json()["logical_date"] is None
    assert airflow.wait_run(run_id)["state"] == "success", airflow.tis(run_id)
    before = airflow.tis(run_id)
    assert {t: ti["try_number"] for t, ti in before.items()} == dict.fromkeys(STAGES, 1)
    first = _done(store)
    assert all(first.values())

    # The date-based recipe selects no task instance of such a run: nothing is cleared.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    r = airflow.cli("tasks", "clear", DAG, "-t", "^matting$", "-d", "-s", today, "-e", today, "-y")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {t: ti["state"] for t, ti in airflow.tis(run_id).items()} == dict.fromkeys(STAGES, "success")

    # Matting made stale (as after a code-version bump): it recomputes, identical bytes, and the rest hit the cache.
    store.delete(manifest_key(store, "018", "matting"))
    body = {"dag_run_id": run_id, "task_ids": ["matting"], "include_downstream": True, "only_failed": False,
            "dry_run": False}
    r = airflow.http.post(f"/dags/{DAG}/clearTaskInstances", json=body)
    assert r.status_code == 200, r.text
    assert sorted(t["task_id"] for t in r.json()["task_instances"]) == ["fitting", "gaussianhead", "matting",
                                                                      "meshhead"]
    assert airflow.wait_run(run_id)["state"] == "success", airflow.tis(run_id)
    after = airflow.tis(run_id)
    for task in ("extract", "sample"):  # untouched: same attempt, same times, same manifest
        assert after[task]["try_number"] == 1 and after[task]["end_date"] == before[task]["end_date"], task
    for task in ("matting", "fitting", "meshhead", "gaussianhead"):
        assert after[task]["try_number"] == 2 and after[task]["state"] == "success", (task, after[task])
        assert after[task]["start_date"] > before[task]["end_date"], task
    second = _done(store)
    assert second["extract"].finished_at == first["extract"].finished_at
    assert second["sample"].finished_at == first["sample"].finished_at
    assert second["matting"].finished_at > first["matting"].finished_at
    assert second["matting"].content_digest == first["matting"].content_digest
    assert "018/matting: running" in airflow.task_log(run_id, "matting", 2)
    for task in ("fitting", "meshhead", "gaussianhead"):
        assert "018/" + task + ": cache hit" in airflow.task_log(run_id, task, 2), task
        assert second[task].finished_at == first[task].finished_at, task
    assert json.dumps(airflow.tis(run_id)["extract"]) == json.dumps(after["extract"])

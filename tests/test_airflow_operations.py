"""Operating the DAGs for months, against real Airflow: GPU placement, time limits, failure mail, priority,
the rendered command, Kubernetes pod requests and final exit codes, the avatar Asset and the comparison DAG."""

from __future__ import annotations

import fcntl
import json
import mailbox
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from test_airflow import REPO, _airflow, _env, _python, airflow_home  # noqa: F401 (the session fixture)

STAGES = ["extract", "sample", "matting", "fitting", "meshhead", "gaussianhead"]
PROBE = '''
import json, os, sys, time
out, name, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
peer = sys.argv[4] if len(sys.argv) > 4 else None
open(os.path.join(out, name + ".start"), "w").write(str(os.getpid()))
deadline, saw_peer = time.monotonic() + hold, peer is None
while time.monotonic() < deadline and not saw_peer:  # both running at once, or give up after `hold`
    saw_peer = os.path.exists(os.path.join(out, peer + ".start"))
    time.sleep(0.1)
time.sleep(1.0 if peer else hold)
json.dump({"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "saw_peer": saw_peer, "pid": os.getpid()},
          open(os.path.join(out, name + ".json"), "w"))
print(json.dumps({"probe": name}))
'''

PROBE_DAG = '''
import sys
from datetime import timedelta
from airflow.sdk import DAG, Param
from headavatar_airflow.execution import ExecutionSettings
from headavatar_airflow.operators import LocalStageOperator
from headavatar_airflow.pipeline import StageSpec

class Probe(LocalStageOperator):
    """The real local operator (GPU lease, environment, subprocess), running a probe instead of the CLI."""
    program = (sys.executable, {probe!r})

GPU = StageSpec("matting", gpu=True)
PAIR = StageSpec("gaussianhead", gpu=True, gpus_param="gaussianhead_gpus")
with DAG("gpu_probe", schedule=None, params={{"id": Param("probe"), "gpu": Param(None, type=["null", "integer"]),
                                             "gaussianhead_gpus": Param(None, type=["null", "integer"])}}):
    settings = ExecutionSettings(backend="local")
    Probe(task_id="a", stage=GPU, settings=settings, command=[{out!r}, "a", "60", "b"])
    Probe(task_id="b", stage=GPU, settings=settings, command=[{out!r}, "b", "60", "a"])
    Probe(task_id="pinned", stage=GPU, settings=settings, command=[{out!r}, "pinned", "0"])
    Probe(task_id="pair", stage=PAIR, settings=settings, command=[{out!r}, "pair", "0"])
    Probe(task_id="hung", stage=GPU, settings=settings, command=[{out!r}, "hung", "600"],
          execution_timeout=timedelta(seconds=5))
    Probe(task_id="orphaned", stage=GPU, settings=settings, command=[{out!r}, "orphaned", "600"])
'''


@pytest.fixture
def probe_env(tmp_path: Path) -> dict[str, str]:
    """A DAG folder holding the probe DAG, on a host with two (simulated) GPUs 0 and 1."""
    dags, out = tmp_path / "dags", tmp_path / "out"
    dags.mkdir()
    out.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    (dags / "gpu_probe.py").write_text(PROBE_DAG.format(probe=str(tmp_path / "probe.py"), out=str(out)))
    return {"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "HEADAVATAR_GPU_DEVICES": "0,1",
            "HEADAVATAR_GPU_LEASE_DIR": str(tmp_path / "leases"), "PROBE_OUT": str(out),
            "AIRFLOW_CONN_HEADAVATAR_S3": json.dumps({"conn_type": "aws", "extra": {"bucket": "unused"}})}


def _task_test(home: Path, env: dict[str, str], task: str, day: int, *extra: str) -> subprocess.Popen:
    """``airflow tasks test`` of one probe task; ``day``: its run's logical date (a test run replaces any other
    run of the DAG with the same logical date, so tasks running at once need their own)."""
    return subprocess.Popen([sys.executable, "-m", "airflow", "tasks", "test", "gpu_probe", task,
                             f"2026-01-{day:02d}", *extra],
                            env={**_env(home, {}), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_concurrent_gpu_stages_get_different_gpus_the_form_wins_and_a_timeout_frees_the_gpu(
        airflow_home: Path, probe_env: dict[str, str]) -> None:  # noqa: F811
    out = Path(probe_env["PROBE_OUT"])
    # Two GPU tasks in two task processes at once: each waits until it sees the other running. Each has its
    # own copy of the metadata database (SQLite takes one writer; a deployment's Postgres takes many), while
    # the GPU leases, the thing under test, are shared.
    own_db = out.parent / "b.db"
    shutil.copyfile(airflow_home / "airflow.db", own_db)
    envs = {"a": probe_env, "b": {**probe_env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{own_db}"}}
    procs = {name: _task_test(airflow_home, envs[name], name, day) for day, name in enumerate(("a", "b"), 1)}
    logs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    seen = {name: json.loads((out / f"{name}.json").read_text()) for name in procs if (out / f"{name}.json").exists()}
    assert sorted(seen) == ["a", "b"], {k: v[-2000:] for k, v in logs.items()}
    assert seen["a"]["saw_peer"] and seen["b"]["saw_peer"], seen  # they really ran at the same time
    assert {seen["a"]["device"], seen["b"]["device"]} == {"0", "1"}, seen  # one GPU each

    # The trigger form's GPU wins over the free-GPU choice (0 is free, 1 is asked for).
    pinned = _task_test(airflow_home, probe_env, "pinned", 3, "-t", json.dumps({"gpu": 1}))
    log = pinned.communicate(timeout=600)[0]
    assert json.loads((out / "pinned.json").read_text())["device"] == "1", log[-2000:]

    # Stage 6 on two GPUs (data-parallel): both leases, both devices visible to the stage.
    pair = _task_test(airflow_home, probe_env, "pair", 6, "-t", json.dumps({"gaussianhead_gpus": 2}))
    log = pair.communicate(timeout=600)[0]
    assert json.loads((out / "pair.json").read_text())["device"] == "0,1", log[-2000:]

    # A hung GPU stage: stopped at its time limit, its process gone and its GPU free again.
    started = time.monotonic()
    hung = _task_test(airflow_home, probe_env, "hung", 4)
    log = hung.communicate(timeout=600)[0]
    assert time.monotonic() - started < 300, log[-2000:]
    assert "AirflowTaskTimeout" in log or "Timeout" in log, log[-3000:]
    assert not (out / "hung.json").exists()  # never finished its 600 s
    pid = int((out / "hung.start").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stage is gone, and with it the last holder of its GPU's lock


def _leased(lease_dir: Path, device: str) -> bool:
    with open(lease_dir / f"gpu-{device}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.slow
def test_a_stage_that_outlives_its_sigkilled_task_keeps_its_gpu(
        airflow_home: Path, probe_env: dict[str, str]) -> None:  # noqa: F811
    out, leases = Path(probe_env["PROBE_OUT"]), Path(probe_env["HEADAVATAR_GPU_LEASE_DIR"])
    task = _task_test(airflow_home, probe_env, "orphaned", 5)
    deadline = time.monotonic() + 300
    while not (out / "orphaned.start").exists() and task.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "orphaned.start").exists(), task.communicate(timeout=60)[0][-3000:]
    stage = int((out / "orphaned.start").read_text())
    task.kill()  # SIGKILL: no on_kill, no cleanup; the stage (its own session) runs on
    task.communicate(timeout=60)
    try:
        os.kill(stage, 0)
        assert _leased(leases, "0") and not _leased(leases, "1")  # GPU 0 stays with the stage still on it
    finally:
        os.kill(stage, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _leased(leases, "0") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _leased(leases, "0")  # free once the stage has ended


LOAD = """
    import json
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag()
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["headavatar_capture"]
"""


def test_capture_dag_limits_priority_alerts_and_avatar_asset(airflow_home: Path, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    subprocess.run(["cp", "-r", str(REPO / "config"), str(config)], check=True)
    (config / "profiles" / "ops-test.yaml").write_text("orchestration: {meshhead_timeout_h: 0.5, dagrun_timeout_h: 30}")
    code = LOAD + """
    compare = bag.dags["headavatar_compare"]
    print(json.dumps({
        "dags": sorted(bag.dags),
        "timeouts": {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks},
        "dagrun_timeout": dag.dagrun_timeout.total_seconds(),
        "weight_rules": sorted({str(t.weight_rule) for t in dag.tasks}),
        "callbacks": sorted({type(cb).__name__ for t in dag.tasks for cb in t.on_failure_callback}),
        "outlets": {t.task_id: [o.name for o in t.outlets] for t in dag.tasks},
        "compare_schedule": [a.name for a in compare.timetable.asset_condition.objects],
        "compare_tasks": {t.task_id: [type(t).__name__, t.cli_command] for t in compare.tasks},
    }, default=str))
    """
    facts = _python(airflow_home, code)
    assert facts["dags"] == ["headavatar_capture", "headavatar_compare", "headavatar_ingest"]
    hours = {"extract": 8, "sample": 2, "matting": 12, "fitting": 12, "meshhead": 24, "gaussianhead": 72}
    assert facts["timeouts"] == {k: v * 3600.0 for k, v in hours.items()}
    assert facts["dagrun_timeout"] == 168 * 3600.0
    assert facts["weight_rules"] == ["upstream"]  # depth-first (the weights themselves: the mail test's run)
    assert facts["callbacks"] == ["StageFailureNotifier"]
    assert facts["outlets"] == {s: (["headavatar_avatar"] if s == "gaussianhead" else []) for s in hours}
    assert facts["compare_schedule"] == ["headavatar_avatar"]
    assert facts["compare_tasks"] == {"compare": ["LocalStageOperator", ["compare", "--mlflow"]]}

    # The limits come from the pipeline config (a profile overrides them like any setting).
    monkeypatch.setenv("HEADAVATAR_CONFIG_DIR", str(config))  # seen by the interpreter _python starts
    monkeypatch.setenv("HEADAVATAR_PROFILE", "ops-test")
    tuned = _python(airflow_home, LOAD + """
    print(json.dumps({"meshhead": dag.task_dict["meshhead"].execution_timeout.total_seconds(),
                      "extract": dag.task_dict["extract"].execution_timeout.total_seconds(),
                      "run": dag.dagrun_timeout.total_seconds()}))
    """)
    assert tuned == {"meshhead": 1800.0, "extract": 8 * 3600.0, "run": 30 * 3600.0}


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def test_kubernetes_pods_request_cpu_memory_disk_and_exit_2_is_final(airflow_home: Path, tmp_path: Path,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)  # a client that is never called: no cluster here
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    facts = _python(airflow_home, LOAD + """
    from kubernetes.client import V1ContainerState, V1ContainerStateTerminated, V1ContainerStatus, V1ObjectMeta
    from kubernetes.client import V1Pod, V1PodStatus
    from airflow.sdk.exceptions import AirflowFailException

    def pod(code):
        state = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=code))
        return V1Pod(metadata=V1ObjectMeta(name="p", namespace="headavatar"), status=V1PodStatus(
            phase="Failed", container_statuses=[V1ContainerStatus(
                name="base", state=state, image="i", image_id="i", ready=False, restart_count=0)]))

    out = {"resources": {}, "failures": {}}
    for t in dag.tasks:
        spec = t.build_pod_request_obj().spec.containers[0].resources
        out["resources"][t.task_id] = {"requests": spec.requests, "limits": spec.limits}
    # Which pods get the XCom sidecar: the commands that write a result file (a stage run, unpack), not compare.
    out["xcom"] = {"extract": dag.task_dict["extract"].do_xcom_push,
                   "unpack": bag.dags["headavatar_ingest"].task_dict["unpack"].do_xcom_push,
                   "compare": bag.dags["headavatar_compare"].task_dict["compare"].do_xcom_push}
    pair = dag.task_dict["gaussianhead"]
    pair.request_gpus({"gaussianhead_gpus": 2})  # a data-parallel run's pod: two GPUs of one node
    out["pair"] = pair.build_pod_request_obj().spec.containers[0].resources.limits
    out["pair_requests"] = pair.build_pod_request_obj().spec.containers[0].resources.requests
    t = dag.task_dict["extract"]
    t.on_finish_action, t.log_events_on_failure, t.arguments = "keep_pod", False, ["run", "extract"]
    # No cluster here: the provider's two API calls on this path answer as a cluster would (no istio, label set).
    t.patch_already_checked = lambda *a, **k: None
    t.is_istio_enabled = lambda *a, **k: False
    for code in (1, 2, 75, 79, 137):
        try:
            t.cleanup(pod(code), pod(code))
        except Exception as e:
            out["failures"][code] = [type(e).__name__, isinstance(e, AirflowFailException), str(e)[:200],
                                     str(getattr(e, "reschedule_date", ""))]
    print(json.dumps(out))
    """, backend="kubernetes")
    res = facts["resources"]
    assert res["extract"] == {"requests": {"cpu": "8", "memory": "16Gi", "ephemeral-storage": "200Gi"},
                              "limits": {"memory": "16Gi", "ephemeral-storage": "200Gi"}}
    assert res["gaussianhead"] == {"requests": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "50Gi"},
                                   "limits": {"memory": "64Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "1"}}
    assert facts["xcom"] == {"extract": True, "unpack": True, "compare": False}
    assert facts["pair"] == {"memory": "128Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "2"}  # 2 ranks
    assert facts["pair_requests"] == {"cpu": "8", "memory": "128Gi", "ephemeral-storage": "50Gi"}
    for stage, r in res.items():
        assert set(r["requests"]) == {"cpu", "memory", "ephemeral-storage"}, stage
    final = {code: f[1] for code, f in facts["failures"].items()}
    assert final == {"1": False, "2": True, "75": False, "79": False, "137": False}, facts["failures"]
    # Exit 79, the stage busy in another run: rescheduled (waits, no retry used), not failed.
    kinds = {code: f[0] for code, f in facts["failures"].items()}
    assert kinds["79"] == "AirflowRescheduleException" and facts["failures"]["79"][3], facts["failures"]
    assert {kinds[c] for c in ("1", "75", "137")} == {"AirflowException"}, kinds
    assert "exited with 2" in facts["failures"]["2"][2] and "returned a failure" in facts["failures"]["2"][2]
    assert all("returned a failure" in facts["failures"][c][2] for c in ("1", "75", "137"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 delivering into a Maildir; stopped by PID."""
    port, maildir = _free_port(), tmp_path / "maildir"
    proc = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                             "-c", "aiosmtpd.handlers.Mailbox", str(maildir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "aiosmtpd did not start"
                time.sleep(0.2)
        yield port, maildir
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.s3
@pytest.mark.slow
def test_a_failed_stage_mails_capture_stage_try_and_log_and_shows_its_command(
        airflow_home: Path, s3_env: dict[str, str], smtp_server: tuple[int, Path]) -> None:  # noqa: F811
    port, maildir = smtp_server
    env = {"AIRFLOW_CONN_HEADAVATAR_S3": _env(airflow_home, s3_env)["AIRFLOW_CONN_HEADAVATAR_S3"],
           "AIRFLOW_CONN_HEADAVATAR_ALERTS": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                                                         "extra": {"to": "oncall@example.org"}}),
           "AIRFLOW__API__BASE_URL": "https://airflow.example.org"}
    # Capture "nosuch" has no raw data: extract exits 2, a final failure (no retry), so the mail goes at once.
    r = _airflow(airflow_home, env, "dags", "test", "headavatar_capture", "--conf", json.dumps({"id": "nosuch"}))
    log = r.stdout + r.stderr
    mails = list(mailbox.Maildir(str(maildir), create=False)) if maildir.exists() else []
    assert len(mails) == 1, log[-3000:]
    mail = mails[0]
    body = mail.get_payload(decode=True).decode()
    assert mail["To"] == "oncall@example.org"
    assert mail["Subject"] == "[headavatar] capture nosuch: extract failed (try 1)"
    run_id = next(line.split()[-1] for line in body.splitlines() if line.startswith("DAG run:"))
    assert "Stage:    extract" in body and "Try:      1 of 4" in body and "exited with 2" in body, body
    assert (f"Log:      https://airflow.example.org/dags/headavatar_capture/runs/{quote(run_id)}/tasks/extract"
            "?try_number=1") in body, body
    # The UI's rendered template of the task: the exact command it ran.
    rendered = _python(airflow_home, f"""
        import json
        from airflow.models.renderedtifields import RenderedTaskInstanceFields as R
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        with create_session() as s:
            rows = s.query(R).filter_by(dag_id="headavatar_capture", run_id={run_id!r}).all()
            tis = s.query(TI).filter_by(dag_id="headavatar_capture", run_id={run_id!r}).all()
            print(json.dumps({{"fields": {{r.task_id: r.rendered_fields for r in rows}},
                               "weights": {{t.task_id: t.priority_weight for t in tis}}}}))
    """)
    assert rendered["fields"]["extract"]["stage_command"] == "headavatar run extract --capture nosuch", rendered
    # Depth-first priority: the later a stage, the higher its weight, so a started capture's next task goes
    # before a new capture's first one.
    assert [rendered["weights"][s] for s in STAGES] == [1, 2, 3, 4, 5, 6], rendered["weights"]


@pytest.mark.s3
@pytest.mark.slow
def test_compare_dag_logs_the_cross_capture_report_to_mlflow(airflow_home: Path, mlflow_server: str,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    experiment = f"ops-compare-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("HEADAVATAR_MLFLOW_EXPERIMENT", experiment)  # this test's runs only
    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment(experiment)
    for capture, psnr in (("018", 31.5), ("019", 29.25)):  # two finished avatars, as stage 6 tracks them
        run = client.create_run(exp_id, tags={"headavatar.kind": "stage", "headavatar.stage": "gaussianhead",
                                              "headavatar.capture": capture, "headavatar.manifest": f"m-{capture}"})
        client.log_metric(run.info.run_id, "holdout_psnr", psnr)
        client.set_terminated(run.info.run_id)
    mlflow_conn = {"conn_type": "http", "extra": {"tracking_uri": mlflow_server}}
    env = {"AIRFLOW_CONN_HEADAVATAR_MLFLOW": json.dumps(mlflow_conn),
           "AIRFLOW_CONN_HEADAVATAR_S3": json.dumps({"conn_type": "aws", "extra": {"bucket": "unused"}})}
    r = _airflow(airflow_home, env, "dags", "test", "headavatar_compare")
    log = r.stdout + r.stderr
    reports = client.search_runs([exp_id], filter_string="tags.`headavatar.kind` = 'compare'")
    assert len(reports) == 1, log[-3000:]
    report = reports[0]
    assert report.data.tags["headavatar.captures"] == "018,019" and report.data.metrics["avatars"] == 2
    assert sorted(a.path for a in client.list_artifacts(report.info.run_id)) == [
        "compare.csv", "compare.html", "compare.txt"]
    csv = Path(client.download_artifacts(report.info.run_id, "compare.csv")).read_text().splitlines()
    assert csv[0].startswith("capture,") and [row.split(",")[0] for row in csv[1:]] == ["018", "019"]
    assert "31.5" in csv[1] and "29.25" in csv[2]


def test_a_task_needing_two_gpus_takes_both_leases_or_none(tmp_path: Path) -> None:
    """All or none: while another process holds GPU 0, a two-GPU lease holds nothing (GPU 1 stays free for a
    one-GPU task) and waits; once GPU 0 is free it holds both, and its stage inherits both locks."""
    sys.path.insert(0, str(REPO / "plugins"))
    from headavatar_airflow.gpus import gpu_lease

    leases = tmp_path / "leases"
    with gpu_lease(["0", "1"], leases, "other") as other:
        assert other.device == "0"
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=other.fds)
    try:  # the lease lives on in a stage process that inherited it
        import threading

        got: list[str] = []
        waiting = threading.Thread(target=lambda: got.extend(_hold_two(gpu_lease, leases)), daemon=True)
        waiting.start()
        time.sleep(1.5)
        assert not got and _leased(leases, "0")  # still waiting ...
        with gpu_lease(["0", "1"], leases, "one-gpu task") as single:
            assert single.device == "1"  # ... and holding nothing meanwhile
    finally:
        holder.kill()
        holder.wait()
    waiting.join(timeout=30)
    assert got == ["0,1"]
    with pytest.raises(ValueError, match="3 GPU"), gpu_lease(["0", "1"], leases, count=3):
        pass


def _hold_two(gpu_lease, leases: Path) -> list[str]:
    with gpu_lease(["0", "1"], leases, "stage 6 on two GPUs", poll_s=0.1, count=2) as lease:
        assert len(lease.fds) == 2 and _leased(leases, "0") and _leased(leases, "1")
        return [lease.device]


def test_docker_containers_ask_the_engine_for_the_leased_gpu() -> None:
    """What DockerOperator sends as HostConfig.DeviceRequests (no engine here: the request object itself)."""
    sys.path.insert(0, str(REPO / "plugins"))
    from headavatar_airflow.operators import gpu_request

    leased = gpu_request("1")
    assert (leased["DeviceIDs"], leased["Count"], leased["Capabilities"]) == (["1"], 0, [["gpu"]])
    assert gpu_request("0,1")["DeviceIDs"] == ["0", "1"]  # data-parallel stage 6: both leased GPUs
    assert gpu_request(None)["Count"] == 1  # host GPUs unknown: any one (the engine's GPU 0) ...
    assert gpu_request(None, 2)["Count"] == 2  # ... or as many as the stage's ranks


def test_a_cpu_only_host_places_gpu_stages_without_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The demo's host has no GPU and no nvidia-smi: a GPU stage run as a subprocess there takes no lease
    and its log has no warning; a host with nvidia-smi whose GPUs cannot be listed still warns."""
    sys.path.insert(0, str(REPO / "plugins"))
    from headavatar_airflow.execution import ExecutionSettings
    from headavatar_airflow.gpus import placed_gpu

    monkeypatch.delenv("HEADAVATAR_GPU_DEVICES", raising=False)
    settings = ExecutionSettings(backend="local", gpu_lease_dir=str(tmp_path / "leases"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nothing on PATH: no nvidia-smi
    caplog.set_level("INFO", logger="headavatar_airflow.gpus")
    with placed_gpu(settings, {}, "run/matting") as lease:
        assert lease is None
    assert [r.levelname for r in caplog.records] == ["INFO"], caplog.text
    assert "no GPU on this host" in caplog.text

    caplog.clear()
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")  # a GPU host whose driver does not answer
    smi.chmod(0o755)
    with placed_gpu(settings, {}, "run/matting") as lease:
        assert lease is None
    assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text


def _extract_task(db: Path, after_run: int) -> tuple[str | None, list[tuple]]:
    """(run state, [(try_number, state, reschedules)] of its extract task) of the first capture run after
    ``after_run``, read off the Airflow database."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        run = con.execute("SELECT run_id, state FROM dag_run WHERE dag_id = 'headavatar_capture' AND id > ? "
                          "ORDER BY id LIMIT 1", (after_run,)).fetchone()
        if run is None:
            return None, []
        tis = con.execute("SELECT ti.try_number, ti.state, (SELECT count(*) FROM task_reschedule r WHERE "
                          "r.ti_id = ti.id) FROM task_instance ti WHERE ti.dag_id = 'headavatar_capture' AND "
                          "ti.task_id = 'extract' AND ti.run_id = ?", (run[0],)).fetchall()
    return run[1], tis


@pytest.mark.s3
@pytest.mark.slow
def test_a_task_whose_stage_another_run_computes_waits_without_using_a_retry(
        airflow_home: Path, store, tiny_capture: Path, s3_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The capture DAG's extract task starts while another run, alive, holds extract's lock for the capture (as
    when a retry meets its first try's stage still running in an orphaned container): the task is rescheduled
    (Airflow's up_for_reschedule: no slot held, no retry used) until the lock is released, then computes the
    stage; its try number stays 1 and the run succeeds. Before exit 79, the busy stage exited 75 and was
    retried: 3 retries used up in minutes, and the run failed."""
    from conftest import upload_capture
    from headavatar.contract.lock import StageLock
    from headavatar.contract.outputs import state_key
    from headavatar.devserver.demo import _last_run_id
    from headavatar.layout import stage_prefix

    upload_capture(store, tiny_capture)
    holder = StageLock(store, state_key(store.key(stage_prefix("018", "extract")), "lock.json"),
                       "capture 018 stage extract (the other run)", ttl=30)
    holder.acquire()  # alive: this process, renewing it
    db = airflow_home / "airflow.db"
    before = _last_run_id(db)
    env = {**_env(airflow_home, s3_env), "HEADAVATAR_BUSY_POLL_S": "1", "HEADAVATAR_BUSY_POLL_MAX_S": "2"}
    run = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", "headavatar_capture", "--conf",
                            json.dumps({"id": "018", "profile": "ci"}),  # the other stages: not under test
                            "--mark-success-pattern", "sample|matting|fitting|meshhead|gaussianhead"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            state, tis = _extract_task(db, before)
            if tis and tis[0][2] >= 3:  # it came back to a held lock three times ...
                break
            time.sleep(0.5)
        state, tis = _extract_task(db, before)
        waiting = tis[0] if tis else None
    finally:
        holder.release()  # ... then the other run ends (here without a result: the waiting task computes it)
    try:
        log = run.communicate(timeout=300)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert waiting is not None and waiting[0] == 1 and waiting[2] >= 3, (waiting, log[-4000:])
    assert waiting[1] in ("up_for_reschedule", "scheduled", "queued", "running"), (waiting, log[-4000:])
    state, tis = _extract_task(db, before)
    assert state == "success", log[-4000:]
    assert [t[:2] for t in tis] == [(1, "success")], (tis, log[-4000:])  # no retry used
    # One line per wait, naming the holder: host, pid and since when.
    waits = [line for line in log.splitlines() if "stage busy: waiting" in line]
    assert len(waits) >= 3, log[-4000:]
    assert all(f"{socket.gethostname()} pid {os.getpid()} since {holder.owner['since']}" in line
               for line in waits), waits[:2]
    assert "018/extract: cache hit" not in log and store.exists(store.key(stage_prefix("018", "extract"),
                                                                          "manifest.json"))

    # A holder alive for longer than the stage's time limit (here 18 s) is stuck: the waiting task gives up, for
    # good and saying why, instead of waiting silently for ever.
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    (config / "profiles" / "busy-test.yaml").write_text("orchestration: {extract_timeout_h: 0.005}")
    store.delete(store.key(stage_prefix("018", "extract"), "manifest.json"))  # not done: no cache hit to take
    stuck = StageLock(store, holder.key, "capture 018 stage extract (a stuck run)", ttl=30)
    stuck.acquire()
    before = _last_run_id(db)
    try:
        r = _airflow(airflow_home, {**env, "HEADAVATAR_CONFIG_DIR": str(config), "HEADAVATAR_PROFILE": "busy-test"},
                     "dags", "test", "headavatar_capture", "--conf", json.dumps({"id": "018", "profile": "ci"}),
                     "--mark-success-pattern", "sample|matting|fitting|meshhead|gaussianhead", timeout=300)
    finally:
        stuck.release()
    log = r.stdout + r.stderr
    state, tis = _extract_task(db, before)
    assert state == "failed" and [t[:2] for t in tis] == [(1, "failed")] and tis[0][2] >= 2, (tis, log[-4000:])
    assert "gave up waiting for another run of this stage after" in log, log[-4000:]
    assert "(the task's time limit is 18 s)" in log and f"pid {os.getpid()} since {stuck.owner['since']}" in log

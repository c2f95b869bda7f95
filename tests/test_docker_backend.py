"""The ``docker`` backend for real: the DAG's tasks as containers of the project's images, started by
DockerOperator on the project's Docker engine, against the embedded SeaweedFS and MLflow servers.

Containers use the host network (the servers listen on 127.0.0.1) and the CPU stage image for
stages 3-6 (``HEADAVATAR_CUDA_IMAGE=headavatar/cpu``, no GPU request).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import upload_capture, zip_capture
from docker_fixtures import docker_env  # noqa: F401 (the session fixture)
from headavatar.contract.stage import read_manifest
from headavatar.devserver.images import cpu_image, preprocess_image
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.layout import MANIFEST, stage_prefix
from headavatar.settings import StorageConfig
from headavatar.storage import ObjectStore
from test_airflow import LOCAL_RUN

# s3_env: the S3 key pair in this process's environment, for the ObjectStore the assertions read with.
pytestmark = [pytest.mark.docker, pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("s3_env")]
REPO = Path(__file__).resolve().parents[1]
STAGES = ["extract", "sample", "matting", "fitting", "meshhead", "gaussianhead"]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, docker_env: dict[str, str]) -> Path:  # noqa: F811
    home = tmp_path_factory.mktemp("airflow-docker")
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=_env(home, docker_env),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return home


def _env(home: Path, docker: dict[str, str], backend: str = "docker", **extra: str) -> dict[str, str]:
    return {**os.environ, **docker, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": f"{REPO / 'plugins'}:{REPO / 'tasks'}", "HEADAVATAR_EXECUTION": backend,
            "HEADAVATAR_DOCKER_URL": docker["DOCKER_HOST"], "HEADAVATAR_DOCKER_NETWORK": "host",
            "HEADAVATAR_CPU_IMAGE": preprocess_image(), "HEADAVATAR_CUDA_IMAGE": cpu_image(),
            "HEADAVATAR_DOCKER_GPUS": "0", **extra}


def _connections(s3: EmbeddedS3, prefix: str, mlflow: str, bucket: str = "headavatar-test") -> dict[str, str]:
    e = s3.env()
    return {"AIRFLOW_CONN_HEADAVATAR_S3": json.dumps({
        "conn_type": "aws", "login": e["AWS_ACCESS_KEY_ID"], "password": e["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": e["HEADAVATAR_S3_ENDPOINT"], "bucket": bucket, "prefix": prefix,
                  "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_HEADAVATAR_MLFLOW": json.dumps({"conn_type": "http", "extra": {"tracking_uri": mlflow}}),
        "HEADAVATAR_MLFLOW_MODEL_PREFIX": f"{prefix}-avatar-"}


def _store(s3: EmbeddedS3, prefix: str) -> ObjectStore:
    e = s3.env()
    return ObjectStore(StorageConfig(endpoint_url=e["HEADAVATAR_S3_ENDPOINT"], bucket="headavatar-test", prefix=prefix))


def _dag_test(env: dict[str, str], dag: str, conf: dict | None = None,
              timeout: float = 1800) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "airflow", "dags", "test", dag]
    if conf is not None:
        args += ["--conf", json.dumps(conf)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _task_states(env: dict[str, str], dag: str) -> dict[str, dict[str, list]]:
    """{run id: {task id: [state, try number]}} of every run of ``dag`` in this Airflow home, read from its
    SQLite database (an interpreter that imports Airflow to ask would cost seconds per call)."""
    with contextlib.closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db", timeout=60)) as db:
        rows = db.execute("SELECT run_id, task_id, state, try_number FROM task_instance WHERE dag_id = ?",
                          (dag,)).fetchall()
    out: dict[str, dict[str, list]] = {}
    for run_id, task_id, state, try_number in rows:
        out.setdefault(run_id, {})[task_id] = [str(state), try_number]
    return out


def _client(docker: dict[str, str]):  # docker-py's DockerClient
    import docker as docker_py

    return docker_py.DockerClient(base_url=docker["DOCKER_HOST"])


def _containers(docker: dict[str, str], env: dict[str, str], **labels: str) -> list[dict]:
    """Containers of this Airflow home's DAG runs (the engine may run other people's too)."""
    runs = {run for dag in ("headavatar_capture", "headavatar_ingest") for run in _task_states(env, dag)}
    client = _client(docker)
    try:
        filters = {"label": ["headavatar.run_id", *(f"{k}={v}" for k, v in labels.items())]}
        return [c.attrs for c in client.containers.list(all=True, filters=filters, ignore_removed=True)
                if c.labels.get("headavatar.run_id") in runs]
    finally:
        client.close()


def _ids(client) -> set[str]:  # client: docker-py's DockerClient
    # ignore_removed: a container removed between the engine's list and docker-py's inspect of it is gone,
    # not an error (the race failed CI once, with the stopped extract container).
    return {c.id for c in client.containers.list(all=True, ignore_removed=True)}


def _volumes(docker: dict[str, str], env: dict[str, str]) -> list[str]:
    runs = {run for dag in ("headavatar_capture", "headavatar_ingest") for run in _task_states(env, dag)}
    client = _client(docker)
    try:
        return [v.name for v in client.volumes.list(filters={"label": "headavatar.scratch"})
                if (v.attrs.get("Labels") or {}).get("headavatar.run_id") in runs]
    finally:
        client.close()


@pytest.fixture
def prefixes(s3: EmbeddedS3, tiny_capture: Path, airflow: Path, docker_env: dict[str, str],  # noqa: F811
             mlflow_server: str, local_dag_runs: dict[str, str]) -> tuple[str, str]:
    """A prefix where the tiny capture went through the DAG on the local backend (the run
    tests/test_airflow.py made, else one made here) and a new one holding the capture, for docker."""
    import secrets

    token = secrets.token_hex(4)
    local_prefix = local_dag_runs.get(json.dumps(LOCAL_RUN))
    if local_prefix is None:
        local_prefix = f"local-{token}"
        store = _store(s3, local_prefix)
        upload_capture(store, tiny_capture)
        store.close()
        local = _dag_test(_env(airflow, docker_env, "local", **_connections(s3, local_prefix, mlflow_server)),
                          "headavatar_capture", LOCAL_RUN)
        assert local.returncode == 0, (local.stdout + local.stderr)[-3000:]
        local_dag_runs[json.dumps(LOCAL_RUN)] = local_prefix
    store = _store(s3, f"docker-{token}")
    upload_capture(store, tiny_capture)
    store.close()
    return local_prefix, f"docker-{token}"


@pytest.mark.timeout(3600)  # the whole pipeline in containers (and on the local backend, when run alone) on 2 cores
def test_dag_runs_all_six_stages_as_containers_with_the_local_backends_results(
        airflow: Path, docker_env: dict[str, str], s3: EmbeddedS3, mlflow_server: str,  # noqa: F811
        prefixes: tuple[str, str]) -> None:
    docker_prefix = prefixes[1]
    conf = LOCAL_RUN
    before = _task_states(_env(airflow, docker_env), "headavatar_capture")
    env = _env(airflow, docker_env, **_connections(s3, docker_prefix, mlflow_server))
    t0 = time.monotonic()
    run = _dag_test(env, "headavatar_capture", conf)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    seconds = time.monotonic() - t0

    # Every task was a DockerStageOperator container of the right image, and its output is in the task log.
    assert log.count("Starting docker container from image") == 6, log[-4000:]
    assert f"Starting docker container from image {preprocess_image()}" in log
    assert f"Starting docker container from image {cpu_image()}" in log
    for stage in STAGES:
        assert f"018/{stage}: " in log, f"{stage}'s own log lines are not in the task log"
    # Same results as the local backend: identical files (content digests) for every stage.
    stores = {p: _store(s3, p) for p in prefixes}
    try:
        for stage in STAGES:
            a, b = (read_manifest(stores[p], "018", stage) for p in prefixes)
            assert a is not None and b is not None, stage
            assert sorted(a.files) == sorted(b.files), stage
            assert a.content_digest == b.content_digest, f"{stage}: docker outputs differ from local ones"
            assert b.config == a.config
    finally:
        for st in stores.values():
            st.close()
    # MLflow: the docker DAG run's parent run, one child per stage, the avatar registered; the parent
    # carries the commit baked into the images.
    from mlflow.tracking import MlflowClient

    from headavatar.devserver.images import git_commit

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("headavatar")
    run_id = next(r for r in _task_states(env, "headavatar_capture") if r not in before)
    parents = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`headavatar.kind` = 'pipeline' and tags.`airflow.run_id` = '{run_id}'"))
    assert len(parents) == 1
    assert parents[0].data.tags["mlflow.source.git.commit"] == git_commit()
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(c.data.tags["headavatar.stage"] for c in children) == sorted(STAGES)
    assert [v.version for v in client.search_model_versions(f"name = '{docker_prefix}-avatar-018'")] == ["1"]
    # No container or scratch volume is left behind.
    assert _containers(docker_env, env) == []
    assert _volumes(docker_env, env) == []
    print(f"docker backend: six stages in {seconds:.0f} s")


def test_exit_code_2_fails_the_task_without_retry(airflow: Path, docker_env: dict[str, str],  # noqa: F811
                                                  s3: EmbeddedS3, mlflow_server: str) -> None:
    env = _env(airflow, docker_env, **_connections(s3, "no-such-capture", mlflow_server))
    r = _dag_test(env, "headavatar_capture", {"id": "404", "profile": "demo"}, timeout=600)
    log = r.stdout + r.stderr
    states = _task_states(env, "headavatar_capture")
    run = next(run for run, tasks in states.items() if tasks.get("extract", [None])[0] == "failed")
    assert states[run]["extract"] == ["failed", 1], states[run]  # AirflowFailException: no second try
    assert states[run]["sample"][0] == "upstream_failed"
    assert "headavatar run extract exited with 2" in log, log[-3000:]
    assert _containers(docker_env, env) == [] and _volumes(docker_env, env) == []


def test_sigterm_to_the_task_runner_stops_its_container(airflow: Path, docker_env: dict[str, str],  # noqa: F811
                                                        s3: EmbeddedS3, mlflow_server: str, tmp_path: Path) -> None:
    import secrets

    from headavatar.layout import RAW
    from headavatar.synthetic.capture import SyntheticSpec, write_capture

    prefix = f"kill-{secrets.token_hex(4)}"
    store = _store(s3, prefix)
    # The demo's 60 frames: extract runs long enough (tens of seconds) to be killed half-way.
    write_capture(SyntheticSpec("018", frames=60, sequences=("EXP-1-head", "EXP-2-eyes"), width=256, height=372),
                  tmp_path / RAW)
    upload_capture(store, tmp_path)
    env = _env(airflow, docker_env, **_connections(s3, prefix, mlflow_server))
    # `airflow dags test` runs each task in-process: this process is the task runner, and its SIGTERM
    # handler calls the operator's on_kill, as a worker's task runner does when the task is killed.
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", "headavatar_capture", "--conf",
                             json.dumps({"id": "018", "profile": "demo"})], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = _client(docker_env)
    before = _ids(client)
    try:
        deadline = time.monotonic() + 600
        mine = None
        while time.monotonic() < deadline and proc.poll() is None and mine is None:
            mine = next((c for c in client.containers.list(filters={
                "label": ["headavatar.dag_id=headavatar_capture", "headavatar.task_id=extract"]}, ignore_removed=True)
                if c.id not in before), None)
            time.sleep(0.5)
        assert mine is not None, "the extract container never started"
        time.sleep(1)  # the stage is decoding inside its container
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while time.monotonic() - killed_at < 30 and mine.id in _ids(client):
            time.sleep(0.2)
        stopped_after = time.monotonic() - killed_at
        assert mine.id not in _ids(client), "container still there after 30 s"
        assert stopped_after < 15, f"container stopped {stopped_after:.1f} s after SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        client.close()
    deadline = time.monotonic() + 30
    while _volumes(docker_env, env) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _volumes(docker_env, env) == []
    assert read_manifest(store, "018", "extract") is None, "extract finished: the kill came too late to prove anything"
    store.close()


def test_ingestion_unpacks_in_a_container_and_a_broken_archive_fails_its_task(
        airflow: Path, docker_env: dict[str, str], s3: EmbeddedS3, mlflow_server: str,  # noqa: F811
        tiny_capture: Path, tmp_path: Path) -> None:
    import secrets

    prefix = f"ingest-{secrets.token_hex(4)}"
    store = _store(s3, prefix)
    raw = store.key("raw")
    zip_capture(tiny_capture / "raw", "020", tmp_path / "zips")
    for z in (tmp_path / "zips").glob("*.zip"):
        store.upload_file(z, f"{raw}/{z.name}")
    env = _env(airflow, docker_env, **_connections(s3, prefix, mlflow_server))
    r = _dag_test(env, "headavatar_ingest", timeout=900)
    log = r.stdout + r.stderr
    assert f"Starting docker container from image {preprocess_image()}" in log, log[-3000:]
    assert store.exists(f"{raw}/sequence_EXP-1-head_part-1/020/EXP-1-head/cam_222200036.mp4")  # unpacked
    states = _task_states(env, "headavatar_ingest")
    first = next(iter(states.values()))
    assert first["unpack"][0] == "success" and first["find_pending_captures"][0] == "success", states

    # A truncated archive: `headavatar unpack` exits non-zero and its task fails (the listing still runs).
    store.put_bytes(f"{raw}/sequence_EXP-9-broken_part-1.zip", b"PK\x03\x04 not really a zip")
    _dag_test(env, "headavatar_ingest", timeout=900)
    after = _task_states(env, "headavatar_ingest")
    new = next(tasks for run, tasks in after.items() if run not in states)
    assert new["unpack"][0] == "failed", new
    assert new["find_pending_captures"][0] == "success", new
    assert _containers(docker_env, env) == [] and _volumes(docker_env, env) == []
    store.close()


def test_a_gpu_whose_stage_container_outlived_its_task_is_not_leased(docker_env: dict[str, str],  # noqa: F811
                                                                     tmp_path: Path) -> None:
    """A SIGKILLed task process drops its GPU lock, but its stage container runs on: the container's
    ``headavatar.gpu`` label keeps that GPU from the next GPU task (a real engine, a real container;
    no GPU here, so the container only carries the label a GPU stage's container gets)."""
    sys.path.insert(0, str(REPO / "plugins"))
    from headavatar_airflow.execution import ExecutionSettings
    from headavatar_airflow.gpus import GPU_LABEL, gpu_lease
    from headavatar_airflow.operators import stage_operator
    from headavatar_airflow.pipeline import StageSpec

    settings = ExecutionSettings(backend="docker", docker_url=docker_env["DOCKER_HOST"], gpu_devices=("0", "1"),
                                 gpu_lease_dir=str(tmp_path / "leases"))
    op = stage_operator(StageSpec("matting", gpu=True), settings)
    client = _client(docker_env)
    orphan = client.containers.run(preprocess_image(), entrypoint=["sleep", "120"], detach=True,
                                   labels={GPU_LABEL: "0", "headavatar.task_id": "orphaned-test"})
    try:
        assert op._gpus_of_running_stages() == {"0"}
        with gpu_lease(settings.gpu_devices, tmp_path / "leases", busy=op._gpus_of_running_stages) as lease:
            assert lease.device == "1"  # GPU 0's lock is free, but its stage still runs
    finally:
        orphan.remove(force=True)
        client.close()
    assert op._gpus_of_running_stages() == set()
    with gpu_lease(settings.gpu_devices, tmp_path / "leases", busy=op._gpus_of_running_stages) as lease:
        assert lease.device == "0"


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_a_task_returns_its_stages_result_whatever_its_output_ends_with(
        backend: str, docker_env: dict[str, str], s3: EmbeddedS3, prefixes: tuple[str, str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The task's result (its XCom: manifest, cached, MLflow run, GPU lease) is read from the CLI's result file:
    here the interpreter writes its allocator statistics to stderr at exit (``PYTHONMALLOCSTATS``), after the
    result line, in the one stream the task log gets. A cache hit of stage 2 on the local backend's run."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "plugins"))
    from headavatar_airflow.execution import ExecutionSettings
    from headavatar_airflow.operators import stage_operator
    from headavatar_airflow.pipeline import StageSpec

    prefix = prefixes[0]
    monkeypatch.setenv("AIRFLOW_CONN_HEADAVATAR_S3", _connections(s3, prefix, "")["AIRFLOW_CONN_HEADAVATAR_S3"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = ExecutionSettings(backend=backend, docker_url=docker_env["DOCKER_HOST"], docker_network="host",
                                 cpu_image=preprocess_image(), mlflow_conn_id="none")
    op = stage_operator(StageSpec("sample", gpu=False), settings)
    if backend == "docker":
        op.environment["PYTHONMALLOCSTATS"] = "1"
    else:
        monkeypatch.setenv("PYTHONMALLOCSTATS", "1")
    ti = SimpleNamespace(dag_id="headavatar_capture", task_id="sample", try_number=1)
    capfd.readouterr()
    result = op.execute({"params": {"id": "018", "profile": "demo"}, "ti": ti, "run_id": f"result-{backend}",
                         "outlet_events": {}})
    task_log = capfd.readouterr().out.rstrip().splitlines()
    store = _store(s3, prefix)
    try:
        assert result is not None and result["cached"] is True, result
        assert result["manifest"] == store.uri(store.key(stage_prefix("018", "sample"), MANIFEST)), result
    finally:
        store.close()
    assert json.dumps(result) in "\n".join(task_log)  # printed, and followed by the statistics:
    assert "Small block threshold" in "\n".join(task_log[-300:]) and result["manifest"] not in task_log[-1]

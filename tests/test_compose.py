"""The compose stack users deploy, brought up for real: `docker compose` (or Debian's docker-compose v1)
starts infra/compose/docker-compose.yml as shipped, with a .env from infra/compose/new-env.py and the
images built from the file's own build: sections (`make images-compose`). A DAG run triggered through the
REST API succeeds with its stage containers started by the scheduler through the socket proxy, nothing
answers anonymously, and each identity may only what its policy allows.

Needs a Docker engine (reused, or started by the project's DockerEngine and stopped by PID), the compose
images and the stage images of `make images` (both built here; cached layers make that seconds).
Run: `pytest -m compose`; skip: `pytest -m "not compose"`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import output_digests, upload_capture
from headavatar.devserver.compose_images import build_compose_images
from headavatar.devserver.docker_engine import DockerEngine
from headavatar.devserver.images import build_images, cpu_image, preprocess_image
from headavatar.layout import stage_prefix
from headavatar.settings import StorageConfig
from headavatar.storage import ObjectStore

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "infra" / "compose"
FILES = [COMPOSE_DIR / "docker-compose.yml"]
STAGES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
# The DAG run: capture 018 (tiny synthetic), the plumbing profile (ci) and short training, as tests/test_airflow.py.
SETTINGS = {"profile": "ci", "meshhead_steps": 20, "gaussianhead_steps": 20}
CONF = {"id": "018", **SETTINGS}
# The stage images of `make images`: stages 3-6 in the CPU build of the CUDA image (no GPU here).
CPU_IMAGE, STAGE_3_6_IMAGE = preprocess_image(), cpu_image()
RUN_TIMEOUT = float(os.environ.get("HEADAVATAR_COMPOSE_RUN_TIMEOUT", "1500"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin exists, else Debian's docker-compose v1."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    v1 = shutil.which("docker-compose")
    assert v1, "neither `docker compose` nor docker-compose is installed (make tools)"
    return [v1]


@dataclass
class Stack:
    project: str
    env_file: Path
    secrets: dict[str, str]
    docker_env: dict[str, str]
    airflow: str
    mlflow: str
    s3: str
    run_ids: list[str] = field(default_factory=list)  # DAG runs this test triggered
    files: list[Path] = field(default_factory=lambda: list(FILES))

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        files = [a for f in self.files for a in ("-f", str(f))]
        r = subprocess.run([*compose_command(), *files, "--env-file", str(self.env_file), "-p", self.project, *args],
                           env=self.docker_env, capture_output=True, text=True, timeout=timeout)
        assert not check or r.returncode == 0, f"compose {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def docker(self, *args: str) -> str:
        r = subprocess.run(["docker", *args], env=self.docker_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def token(self) -> str:
        r = requests.post(f"{self.airflow}/auth/token", timeout=30,
                          json={"username": self.secrets["AIRFLOW_ADMIN_USER"],
                                "password": self.secrets["AIRFLOW_ADMIN_PASSWORD"]})
        assert r.status_code in (200, 201), r.text
        return r.json()["access_token"]

    def s3_client(self, key: str, secret: str) -> Any:
        return boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret, config=Config(retries={"max_attempts": 2}))


PORTS = ("HEADAVATAR_AIRFLOW_PORT", "HEADAVATAR_MLFLOW_PORT", "HEADAVATAR_S3_PORT", "HEADAVATAR_POSTGRES_PORT",
         "HEADAVATAR_REDIS_PORT", "HEADAVATAR_FLOWER_PORT")


def _env_file(path: Path, socket_path: Path, project: str, **settings: str) -> dict[str, str]:
    """The .env an operator makes (infra/compose/new-env.py: fresh random secrets), with free host ports,
    this engine's socket and the CPU stage images; ``settings`` on top."""
    ports = {k: str(free_port()) for k in PORTS}
    overrides = {
        "COMPOSE_PROJECT_NAME": project, **ports, "DOCKER_SOCKET": str(socket_path),
        "HEADAVATAR_MLFLOW_UI_URL": f"http://127.0.0.1:{ports['HEADAVATAR_MLFLOW_PORT']}",
        "HEADAVATAR_CPU_IMAGE": CPU_IMAGE, "HEADAVATAR_CUDA_IMAGE": STAGE_3_6_IMAGE, "HEADAVATAR_DOCKER_GPUS": "0",
        "AIRFLOW_DAGS_PAUSED_AT_CREATION": "true",  # the ingestion DAG stays off: one run, the test's
        # A password an operator may well choose: one that starts with "-" once made airflow-init's
        # `users create` read it as an option (exit 2, seen in CI with a random token_urlsafe secret).
        "AIRFLOW_ADMIN_PASSWORD": "-" + secrets.token_urlsafe(18),
        **settings,
    }
    subprocess.run([sys.executable, str(COMPOSE_DIR / "new-env.py"), "--out", str(path),
                    *(f"{k}={v}" for k, v in overrides.items())], capture_output=True, text=True, check=True)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert "change-me" not in values.values() and values["DOCKER_GID"] == str(socket_path.stat().st_gid)
    return values


def _wait(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except (requests.RequestException, ClientError, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what} not ready after {timeout:.0f} s (last error: {last})")


@pytest.fixture(scope="module")
def docker_env() -> Iterator[dict[str, str]]:
    """DOCKER_HOST of a running engine: the caller's, else the project's engine (started here if needed)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DOCKER_BUILDKIT": "0"}
    if os.environ.get("DOCKER_HOST"):
        yield {**base, "DOCKER_HOST": os.environ["DOCKER_HOST"]}
        return
    engine = DockerEngine(REPO / ".headavatar" / "docker")
    engine.start()  # reuses a running one; stop() ends only an engine this fixture started
    try:
        yield {**base, **engine.env()}
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def stack(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(docker_env, tmp_path_factory.mktemp("compose")) as st:
        yield st


@contextmanager
def running_stack(docker_env: dict[str, str], env_dir: Path, **settings: str) -> Iterator[Stack]:
    """docker-compose.yml up with a fresh .env (``settings`` on top), healthy; down with its volumes after."""
    socket_path = Path(docker_env["DOCKER_HOST"].removeprefix("unix://"))
    assert socket_path.is_socket(), f"compose needs a unix-socket engine, not {docker_env['DOCKER_HOST']}"
    build_compose_images(env=docker_env)  # as `make images-compose` (cached)
    build_images(env=docker_env)  # the stage images, as `make images` (cached)
    project = f"hacompose{secrets.token_hex(3)}"
    env_file = env_dir / ".env"
    values = _env_file(env_file, socket_path, project, **settings)
    host = values.get("HEADAVATAR_BIND", "127.0.0.1")
    st = Stack(project, env_file, values, docker_env,
               airflow=f"http://{host}:{values['HEADAVATAR_AIRFLOW_PORT']}",
               mlflow=f"http://{host}:{values['HEADAVATAR_MLFLOW_PORT']}",
               s3=f"http://{host}:{values['HEADAVATAR_S3_PORT']}")
    started = time.monotonic()
    try:
        up = st.compose("up", "-d", check=False)
        if up.returncode != 0:  # an init step failed: its own words say why
            logs = st.compose("logs", "--no-color", "--tail", "60", "airflow-init", "s3-init", "mlflow-init",
                              check=False).stdout
            pytest.fail(f"compose up failed:\n{up.stderr[-2000:]}\n{logs[-6000:]}")
        _wait("Airflow api-server", lambda: requests.get(f"{st.airflow}/api/v2/monitor/health", timeout=5).ok, 600)

        def all_healthy() -> bool:
            health = requests.get(f"{st.airflow}/api/v2/monitor/health", timeout=5).json()
            return all(health.get(c, {}).get("status") == "healthy"
                       for c in ("metadatabase", "scheduler", "dag_processor", "triggerer"))

        _wait("Airflow scheduler, dag-processor and triggerer", all_healthy, 300)
        _wait("MLflow", lambda: requests.get(f"{st.mlflow}/health", timeout=5).ok, 300)
        print(f"\ncompose stack healthy {time.monotonic() - started:.0f} s after `up`", file=sys.stderr)
        yield st
    finally:
        if os.environ.get("HEADAVATAR_COMPOSE_KEEP_LOGS"):
            print(st.compose("logs", "--no-color", check=False).stdout[-20000:], file=sys.stderr)
        st.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        _remove_stage_leftovers(st)


def _remove_stage_leftovers(st: Stack) -> None:
    """Stage containers still running when the scheduler stopped (a failed or timed-out run) outlive
    `down` and keep the network; they and their scratch volumes are removed by the run ids this test made."""
    for run_id in st.run_ids:
        for kind in ("container", "volume"):
            listing = subprocess.run(["docker", kind, "ls", "-q", *(("-a",) if kind == "container" else ()),
                                      "--filter", f"label=headavatar.run_id={run_id}"],
                                     env=st.docker_env, capture_output=True, text=True).stdout.split()
            if listing:
                rm = ["docker", "rm", "-f", "-v"] if kind == "container" else ["docker", "volume", "rm", "-f"]
                subprocess.run([*rm, *listing], env=st.docker_env, capture_output=True)
    if st.run_ids:
        subprocess.run(["docker", "network", "rm", "headavatar"], env=st.docker_env, capture_output=True)


CAPTURE_DAG = "/api/v2/dags/headavatar_capture"


def unpause_capture_dag(stack: Stack) -> str:
    """Waits for headavatar_capture to be parsed and unpauses it; its REST address."""
    auth = {"Authorization": f"Bearer {stack.token()}"}
    api = stack.airflow + CAPTURE_DAG
    _wait("the DAG parsed", lambda: requests.get(api, headers=auth, timeout=10).ok, 300)
    assert requests.patch(api, headers=auth, json={"is_paused": False}, timeout=30).ok
    return api


def trigger(stack: Stack, conf: dict[str, Any]) -> str:
    """A run of headavatar_capture through the REST API, as the UI's trigger form makes it; its run id."""
    r = requests.post(f"{stack.airflow}{CAPTURE_DAG}/dagRuns", headers={"Authorization": f"Bearer {stack.token()}"},
                      json={"logical_date": None, "conf": conf}, timeout=30)
    assert r.status_code in (200, 201), r.text
    stack.run_ids.append(r.json()["dag_run_id"])
    return r.json()["dag_run_id"]


def finished_run(stack: Stack, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """The DAG run once it succeeded or failed."""
    def finished() -> dict | None:
        run = requests.get(f"{stack.airflow}{CAPTURE_DAG}/dagRuns/{run_id}",
                           headers={"Authorization": f"Bearer {stack.token()}"}, timeout=30).json()
        return run if run["state"] in ("success", "failed") else None

    return _wait(f"DAG run {run_id}", finished, timeout, interval=10)


def test_nothing_answers_anonymously_and_the_env_credentials_work(stack: Stack) -> None:
    s = stack.secrets
    # Airflow (FAB auth manager): no token -> 401; a wrong password gets no token; the admin from .env does.
    assert requests.get(f"{stack.airflow}/api/v2/dags", timeout=30).status_code == 401
    bad = requests.post(f"{stack.airflow}/auth/token", json={"username": s["AIRFLOW_ADMIN_USER"],
                                                             "password": "not-" + s["AIRFLOW_ADMIN_PASSWORD"]},
                        timeout=30)
    assert bad.status_code in (401, 403), bad.text
    auth = {"Authorization": f"Bearer {stack.token()}"}
    assert requests.get(f"{stack.airflow}/api/v2/dags", headers=auth, timeout=30).status_code == 200
    # MLflow (basic-auth app): anonymous and wrong password -> 401; the .env admin -> 200.
    search = f"{stack.mlflow}/api/2.0/mlflow/experiments/search"
    assert requests.post(search, json={"max_results": 1}, timeout=30).status_code == 401
    wrong = (s["MLFLOW_ADMIN_USER"], "not-" + s["MLFLOW_ADMIN_PASSWORD"])
    assert requests.post(search, json={"max_results": 1}, auth=wrong, timeout=30).status_code == 401
    ok = requests.post(search, json={"max_results": 1}, auth=(s["MLFLOW_ADMIN_USER"], s["MLFLOW_ADMIN_PASSWORD"]),
                       timeout=30)
    assert ok.status_code == 200, ok.text
    # Object store: unsigned and wrongly signed requests are refused; the stages' identity lists the bucket.
    anonymous = boto3.client("s3", endpoint_url=stack.s3, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    for call in (lambda c: c.list_objects_v2(Bucket="headavatar"), lambda c: c.list_buckets(),
                 lambda c: c.put_object(Bucket="headavatar", Key="nersemble/raw/x", Body=b"x")):
        with pytest.raises(ClientError) as refused:
            call(anonymous)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        stack.s3_client(s["S3_STAGES_ACCESS_KEY"], "wrong" + s["S3_STAGES_SECRET_KEY"]).list_objects_v2(
            Bucket="headavatar")
    stages = stack.s3_client(s["S3_STAGES_ACCESS_KEY"], s["S3_STAGES_SECRET_KEY"])
    assert stages.list_objects_v2(Bucket="headavatar")["ResponseMetadata"]["HTTPStatusCode"] == 200
    # The socket proxy, seen from the scheduler: containers and volumes (scratch) yes; networks, exec, swarm no.
    def proxy(path: str, method: str = "GET") -> str:
        code = (f"import urllib.request as u, urllib.error as e\ntry: print(u.urlopen(u.Request("
                f"'http://docker-proxy:2375{path}', method='{method}', data=b'{{}}' if '{method}' == 'POST' "
                f"else None, headers={{'Content-Type': 'application/json'}})).status)\n"
                "except e.HTTPError as x: print(x.code)")
        return stack.compose("exec", "-T", "airflow-scheduler", "python", "-c", code).stdout.strip()

    assert proxy("/v1.41/containers/json") == "200"
    assert proxy("/v1.41/volumes") == "200"
    assert proxy("/v1.41/swarm") == "403"
    assert proxy("/v1.41/networks") == "403"
    assert proxy("/v1.41/containers/x/exec", "POST") == "403"


def test_each_identity_may_do_only_what_its_policy_allows(stack: Stack) -> None:
    """Least privilege: the stages' S3 identity cannot write raw/, ingestion's cannot write avatars/, the
    read-only one writes nothing; the stages' MLflow user cannot manage users; the Airflow connections
    hand the stages exactly those identities. s3-init and mlflow-init proved the same before `up` went on."""
    s = stack.secrets

    def may_put(identity: str, key: str) -> bool:
        client = stack.s3_client(s[f"S3_{identity}_ACCESS_KEY"], s[f"S3_{identity}_SECRET_KEY"])
        try:
            client.put_object(Bucket="headavatar", Key=key, Body=b"probe")
        except ClientError as e:
            assert e.response["Error"]["Code"] == "AccessDenied", e.response
            return False
        client.delete_object(Bucket="headavatar", Key=key)
        return True

    raw, avatars = "nersemble/raw/camera_params/990/camera_params.json", "nersemble/avatars/990/extract/probe"
    assert (may_put("STAGES", raw), may_put("STAGES", avatars)) == (False, True)
    assert (may_put("INGEST", raw), may_put("INGEST", avatars)) == (True, False)
    assert (may_put("READONLY", raw), may_put("READONLY", avatars), may_put("READONLY", "mlflow/x")) == (
        False, False, False)
    assert (may_put("MLFLOW", "mlflow/probe"), may_put("MLFLOW", raw)) == (True, False)
    admin = stack.s3_client(s["S3_ADMIN_USER"], s["S3_ADMIN_PASSWORD"])
    admin.put_object(Bucket="headavatar", Key=avatars, Body=b"done")
    readonly = stack.s3_client(s["S3_READONLY_ACCESS_KEY"], s["S3_READONLY_SECRET_KEY"])
    assert readonly.get_object(Bucket="headavatar", Key=avatars)["Body"].read() == b"done"
    admin.delete_object(Bucket="headavatar", Key=avatars)
    # MLflow: the pipeline user signs in but may not create users, make itself admin or re-key the admin.
    users, pipeline = f"{stack.mlflow}/api/2.0/mlflow/users", (s["MLFLOW_PIPELINE_USER"], s["MLFLOW_PIPELINE_PASSWORD"])
    me = requests.get(f"{users}/current", auth=pipeline, timeout=30)
    assert me.status_code == 200 and me.json()["user"]["is_admin"] is False, me.text
    for method, path, body in (
            ("POST", "create", {"username": "intruder", "password": secrets.token_urlsafe(16)}),
            ("PATCH", "update-admin", {"username": s["MLFLOW_PIPELINE_USER"], "is_admin": True}),
            ("PATCH", "update-password", {"username": s["MLFLOW_ADMIN_USER"], "password": "taken-over-1234"})):
        r = requests.request(method, f"{users}/{path}", json=body, auth=pipeline, timeout=30)
        assert r.status_code == 403, (path, r.status_code, r.text[:300])
    # The identities the scheduler hands the stages and ingestion.
    code = ("import json, os, sys\nsys.path.insert(0, '/opt/airflow/plugins')\n"
            "from headavatar_airflow.execution import ExecutionSettings as E\n"
            "c = lambda i: json.loads(os.environ['AIRFLOW_CONN_' + i.upper()])['login']\n"
            "print(c(E().s3_conn_id), c(E().for_ingestion().s3_conn_id), c(E().mlflow_conn_id))")
    logins = stack.compose("exec", "-T", "airflow-scheduler", "python", "-c", code).stdout.split()
    assert logins == [s["S3_STAGES_ACCESS_KEY"], s["S3_INGEST_ACCESS_KEY"], s["MLFLOW_PIPELINE_USER"]]
    init_logs = stack.compose("logs", "--no-color", "s3-init", "mlflow-init").stdout
    assert "ingest, mlflow, readonly, stages limited to their policies" in init_logs, init_logs[-2000:]
    assert f"pipeline user {s['MLFLOW_PIPELINE_USER']} created; not an admin;" in init_logs, init_logs[-2000:]


def test_credentials_come_only_from_the_env_file(stack: Stack) -> None:
    secret_values = [v for k, v in stack.secrets.items() if any(w in k for w in ("PASSWORD", "SECRET", "FERNET"))]
    assert len(secret_values) >= 14
    # Not in the compose files or anything else under infra/ ...
    for path in (REPO / "infra").rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(v in text for v in secret_values), path
    # ... nor in any image the stack runs (their config, environment and history).
    images: set[str] = set()
    ids = stack.compose("ps", "-q").stdout.split()
    assert len(ids) >= 8
    for cid in ids:
        images.add(json.loads(stack.docker("inspect", cid))[0]["Config"]["Image"])
    for image in images:
        meta = stack.docker("image", "inspect", image) + stack.docker("history", "--no-trunc", image)
        assert not any(v in meta for v in secret_values), image
    # The stack refuses to start without them: each missing secret is named.
    for key in ("POSTGRES_PASSWORD", "S3_ADMIN_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                "MLFLOW_PIPELINE_PASSWORD", "S3_STAGES_SECRET_KEY", "S3_INGEST_SECRET_KEY", "S3_MLFLOW_SECRET_KEY",
                "MLFLOW_FLASK_SECRET_KEY", "AIRFLOW_API_SECRET_KEY"):
        partial = stack.env_file.with_name(f"missing-{key}.env")
        partial.write_text("".join(line for line in stack.env_file.read_text().splitlines(keepends=True)
                                   if not line.startswith(f"{key}=")))
        files = [a for f in FILES for a in ("-f", str(f))]
        r = subprocess.run([*compose_command(), *files, "--env-file", str(partial), "config", "-q"],
                           env=stack.docker_env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and f"set {key} in .env" in r.stderr, (key, r.stderr)


def admin_store(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """The capture provider's view of the bucket (S3 admin; credentials from the environment, as boto3 reads)."""
    s = stack.secrets
    for key, value in {"AWS_ACCESS_KEY_ID": s["S3_ADMIN_USER"], "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_SECRET_ACCESS_KEY": s["S3_ADMIN_PASSWORD"]}.items():
        monkeypatch.setenv(key, value)
    return ObjectStore(StorageConfig(endpoint_url=stack.s3, bucket=s["HEADAVATAR_BUCKET"], prefix="nersemble"))


def test_a_dag_run_triggered_through_the_api_succeeds_with_stage_containers_via_the_proxy(
        stack: Stack, tiny_capture: Path, monkeypatch: pytest.MonkeyPatch,
        compose_outputs: dict[str, dict[str, dict[str, str]]]) -> None:
    s = stack.secrets
    # The capture's provider uploads it (raw/ and the synthetic ground truth, which the stages' identity only reads).
    store = admin_store(stack, monkeypatch)
    upload_capture(store, tiny_capture)
    api = unpause_capture_dag(stack)
    started = time.monotonic()
    run_id = trigger(stack, CONF)
    run = finished_run(stack, run_id)
    print(f"\nDAG run {run['state']} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    auth = {"Authorization": f"Bearer {stack.token()}"}
    tis = requests.get(f"{api}/dagRuns/{run_id}/taskInstances", headers=auth, timeout=30).json()["task_instances"]
    states = {t["task_id"]: t["state"] for t in tis}
    if run["state"] != "success":
        logs = stack.compose("logs", "--no-color", "--tail", "200", "airflow-scheduler", check=False).stdout
        pytest.fail(f"DAG run {run['state']}: {states}\n{logs[-6000:]}")
    assert states == dict.fromkeys(STAGES, "success")

    # Each stage ran in its own container, created through the proxy (its access log) by the scheduler,
    # on the stack's network, from the stage images.
    proxy_log = stack.compose("logs", "--no-color", "docker-proxy").stdout
    assert proxy_log.count("/containers/create") >= len(STAGES), proxy_log[-3000:]
    # (Engine events are not used: dockerd keeps only its last 256 events, fewer than a busy host makes in a run.)
    assert len(re.findall(r"POST /v[0-9.]+/containers/[0-9a-f]{64}/start", proxy_log)) >= len(STAGES), proxy_log[-3000:]
    # The stages' outputs are in the stack's object store, and each logged its MLflow run behind basic auth.
    stages = stack.s3_client(s["S3_STAGES_ACCESS_KEY"], s["S3_STAGES_SECRET_KEY"])
    for stage in STAGES:
        key = f"nersemble/{stage_prefix('018', stage)}/manifest.json"
        assert stages.head_object(Bucket=s["HEADAVATAR_BUCKET"], Key=key)["ContentLength"] > 0, key
    compose_outputs[json.dumps(SETTINGS, sort_keys=True)] = {st: output_digests(store, "018", st) for st in STAGES}
    store.close()
    mlflow_auth = (s["MLFLOW_ADMIN_USER"], s["MLFLOW_ADMIN_PASSWORD"])
    for ti in tis:
        xcom = requests.get(f"{api}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/xcomEntries/return_value",
                            headers=auth, timeout=30).json()
        assert "value" in xcom, (ti["task_id"], xcom)
        value = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
        mlflow_run = value["mlflow"]
        got = requests.get(f"{stack.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": mlflow_run["run_id"]},
                           auth=mlflow_auth, timeout=30)
        assert got.status_code == 200 and got.json()["run"]["info"]["status"] == "FINISHED", got.text
        link = requests.get(f"{api}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/links", headers=auth,
                            timeout=30).json()
        assert mlflow_run["run_id"] in json.dumps(link), link

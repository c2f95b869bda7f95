"""The compose stack users deploy, brought up for real: `docker compose` (or Debian's docker-compose v1)
starts infra/compose/docker-compose.yml as shipped, with a .env from infra/compose/new-env.py and the
images built from the file's own build: sections (`make images-compose`). An uploaded capture is found by
ingestion, whose run succeeds with the ingestion parameters and its stage containers started by the scheduler
through the socket proxy; nothing answers anonymously, and each identity may only what its policy allows.

Needs a Docker engine (reused, or started by the project's DockerEngine and stopped by PID), the compose
images and the stage images of `make images` (both built here; cached layers make that seconds).
Run: `pytest -m compose`; skip: `pytest -m "not compose"`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import output_digests, upload_capture
from headavatar.devserver.compose_stack import (
    CENTRAL_FILE,
    Stack,
    compose_command,
    docker_engine_env,
    running_stack,
    wait_for,
)
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
STAGES = ("extract", "sample", "matting", "fitting", "meshhead", "gaussianhead")
# The DAG run: capture 018 (tiny synthetic), the plumbing profile (ci) and short training, as tests/test_airflow.py.
SETTINGS = {"profile": "ci", "meshhead_steps": 20, "gaussianhead_steps": 20}
CONF = {"id": "018", **SETTINGS}
RUN_TIMEOUT = float(os.environ.get("HEADAVATAR_COMPOSE_RUN_TIMEOUT", "1500"))


@pytest.fixture(scope="module")
def docker_env() -> Iterator[dict[str, str]]:
    with docker_engine_env() as env:
        yield env


@pytest.fixture(scope="module")
def stack(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ingestion = {"HEADAVATAR_INGEST_PARAMS": json.dumps(SETTINGS)}  # what each capture ingestion finds runs with
    with running_stack(docker_env, tmp_path_factory.mktemp("compose"), **ingestion) as st:
        yield st


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
    # new-env.py's file: private, every change-me replaced, the engine socket's group for the proxy.
    assert stack.env_file.stat().st_mode & 0o777 == 0o600
    assert "change-me" not in stack.secrets.values()
    assert stack.secrets["DOCKER_GID"] == str(Path(stack.docker_env["DOCKER_HOST"].removeprefix("unix://")).stat().st_gid)
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
        files = [a for f in [CENTRAL_FILE] for a in ("-f", str(f))]
        r = subprocess.run([*compose_command(), *files, "--env-file", str(partial), "config", "-q"],
                           env=stack.docker_env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and f"set {key} in .env" in r.stderr, (key, r.stderr)


def admin_store(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """The capture provider's view of the bucket (S3 admin; credentials from the environment, as boto3 reads)."""
    for key, value in stack.admin_s3_env().items():
        monkeypatch.setenv(key, value)
    return ObjectStore(stack.storage())


def test_an_ingested_capture_runs_with_stage_containers_via_the_proxy(
        stack: Stack, tiny_capture: Path, monkeypatch: pytest.MonkeyPatch,
        compose_outputs: dict[str, dict[str, dict[str, str]]]) -> None:
    s = stack.secrets
    # The capture's provider uploads it (raw/ and the synthetic ground truth, which the stages' identity only reads).
    store = admin_store(stack, monkeypatch)
    upload_capture(store, tiny_capture)
    # Ingestion (its scheduled run, brought forward by hand) finds it and triggers its run with the stack's
    # HEADAVATAR_INGEST_PARAMS.
    stack.unpause()
    stack.unpause("headavatar_ingest")
    started = time.monotonic()
    stack.api("POST", "/dags/headavatar_ingest/dagRuns", json={"logical_date": None})

    def ingested() -> dict[str, Any] | None:
        runs = stack.api("GET", "/dags/headavatar_capture/dagRuns")["dag_runs"]
        return next((r for r in runs if r["dag_run_id"].startswith("ingest__018__")), None)

    triggered = wait_for("the capture run ingestion triggers", ingested, 300, interval=5)
    run_id = triggered["dag_run_id"]
    assert triggered["conf"] == CONF, triggered["conf"]
    run = stack.finished_run(run_id, RUN_TIMEOUT)
    print(f"\nDAG run {run['state']} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    tis = stack.task_instances(run_id)
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
        mlflow_run = stack.return_value(run_id, ti["task_id"])["mlflow"]
        got = requests.get(f"{stack.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": mlflow_run["run_id"]},
                           auth=mlflow_auth, timeout=30)
        assert got.status_code == 200 and got.json()["run"]["info"]["status"] == "FINISHED", got.text
        link = stack.api("GET", f"/dags/headavatar_capture/dagRuns/{run_id}/taskInstances/{ti['task_id']}/links")
        assert mlflow_run["run_id"] in json.dumps(link), link

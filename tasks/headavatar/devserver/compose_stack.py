"""The compose stack users deploy, brought up on this machine's Docker engine: infra/compose/docker-compose.yml as
shipped (its `celery` profile for several hosts), with a .env from infra/compose/new-env.py and the images its
build: sections make, and added hosts from docker-compose.worker.yml. The compose tests and the ingestion load
benchmark drive the same stack through these, and its REST API as the UI does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from headavatar.devserver.common import REPO
from headavatar.devserver.compose_images import build_compose_images
from headavatar.devserver.docker_engine import DockerEngine
from headavatar.devserver.images import build_images, cpu_image, preprocess_image
from headavatar.devserver.seaweed import free_port
from headavatar.settings import StorageConfig

COMPOSE_DIR = REPO / "infra" / "compose"
CENTRAL_FILE = COMPOSE_DIR / "docker-compose.yml"
WORKER_FILE = COMPOSE_DIR / "docker-compose.worker.yml"
CAPTURE_DAG = "/dags/headavatar_capture"  # under /api/v2
PORTS = ("HEADAVATAR_AIRFLOW_PORT", "HEADAVATAR_MLFLOW_PORT", "HEADAVATAR_S3_PORT", "HEADAVATAR_POSTGRES_PORT",
         "HEADAVATAR_REDIS_PORT", "HEADAVATAR_FLOWER_PORT")


class StackError(RuntimeError):
    """The stack did not come up or a command against it failed; the message carries the logs that say why."""


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin exists, else Debian's docker-compose v1."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    v1 = shutil.which("docker-compose")
    if not v1:
        raise StackError("neither `docker compose` nor docker-compose is installed (make tools)")
    return [v1]


@contextmanager
def docker_engine_env() -> Iterator[dict[str, str]]:
    """The environment of a running Docker engine for docker and compose commands: the caller's DOCKER_HOST,
    else the project's engine (started here if none runs, and stopped after only if started here)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DOCKER_BUILDKIT": "0"}
    if os.environ.get("DOCKER_HOST"):
        yield {**base, "DOCKER_HOST": os.environ["DOCKER_HOST"]}
        return
    engine = DockerEngine(REPO / ".headavatar" / "docker")
    engine.start()  # reuses a running one; stop() ends only an engine started here
    try:
        yield {**base, **engine.env()}
    finally:
        engine.stop()


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """``probe()``'s first truthy result; connection errors count as not yet."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except (requests.RequestException, ClientError, OSError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last})")


@dataclass
class Stack:
    """One running central stack: its compose project, .env values and published addresses."""

    project: str
    env_file: Path
    secrets: dict[str, str]
    docker_env: dict[str, str]
    airflow: str
    mlflow: str
    s3: str

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run([*compose_command(), "-f", str(CENTRAL_FILE), "--env-file", str(self.env_file),
                            "-p", self.project, *args],
                           env=self.docker_env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise StackError(f"compose {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def docker(self, *args: str) -> str:
        r = subprocess.run(["docker", *args], env=self.docker_env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise StackError(f"docker {args[0]} failed: {r.stderr}")
        return r.stdout

    def token(self) -> str:
        r = requests.post(f"{self.airflow}/auth/token", timeout=30,
                          json={"username": self.secrets["AIRFLOW_ADMIN_USER"],
                                "password": self.secrets["AIRFLOW_ADMIN_PASSWORD"]})
        if r.status_code not in (200, 201):
            raise StackError(f"no Airflow token: {r.status_code} {r.text}")
        return r.json()["access_token"]

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Airflow's REST API as the admin: the JSON answer of ``method path`` (under /api/v2)."""
        r = requests.request(method, f"{self.airflow}/api/v2{path}", timeout=30,
                             headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)
        if not r.ok:
            raise StackError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def s3_client(self, key: str, secret: str) -> Any:
        return boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret, config=Config(retries={"max_attempts": 2}))

    def admin_s3_env(self) -> dict[str, str]:
        """The capture provider's S3 credentials (the admin), as boto3 reads them from the environment."""
        return {"AWS_ACCESS_KEY_ID": self.secrets["S3_ADMIN_USER"], "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SECRET_ACCESS_KEY": self.secrets["S3_ADMIN_PASSWORD"]}

    def storage(self) -> StorageConfig:
        """The stack's bucket as the stages see it (credentials come from the environment: ``admin_s3_env``)."""
        return StorageConfig(endpoint_url=self.s3, bucket=self.secrets["HEADAVATAR_BUCKET"], prefix="nersemble")

    # The capture DAG, through the REST API as the UI uses it.
    def unpause(self, dag_id: str = "headavatar_capture") -> None:
        """Waits for ``dag_id`` to be parsed and unpauses it."""
        wait_for(f"the DAG {dag_id} parsed", lambda: self.api("GET", f"/dags/{dag_id}"), 300)
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, conf: dict[str, Any]) -> str:
        """A run of headavatar_capture, as the UI's trigger form makes it; its run id."""
        return self.api("POST", f"{CAPTURE_DAG}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]

    def finished_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        """The capture DAG's run once it succeeded or failed."""
        def finished() -> dict | None:
            run = self.api("GET", f"{CAPTURE_DAG}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        return wait_for(f"DAG run {run_id}", finished, timeout, interval=10)

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"{CAPTURE_DAG}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def return_value(self, run_id: str, task_id: str) -> Any:
        """A capture task's return value (XCom ``return_value``), decoded."""
        value = self.api("GET", f"{CAPTURE_DAG}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")[
            "value"]
        return value if isinstance(value, dict) else json.loads(value)


def write_env_file(path: Path, socket_path: Path, project: str, **settings: str) -> dict[str, str]:
    """The .env an operator makes (infra/compose/new-env.py: fresh random secrets), with free host ports,
    this engine's socket and the CPU stage images (no GPU here); ``settings`` on top. Its values."""
    ports = {k: str(free_port()) for k in PORTS}
    overrides = {
        "COMPOSE_PROJECT_NAME": project, **ports, "DOCKER_SOCKET": str(socket_path),
        "HEADAVATAR_MLFLOW_UI_URL": f"http://127.0.0.1:{ports['HEADAVATAR_MLFLOW_PORT']}",
        "HEADAVATAR_CPU_IMAGE": preprocess_image(), "HEADAVATAR_CUDA_IMAGE": cpu_image(), "HEADAVATAR_DOCKER_GPUS": "0",
        "AIRFLOW_DAGS_PAUSED_AT_CREATION": "true",  # nothing runs until the caller unpauses it
        # A password an operator may well choose: one that starts with "-" once made airflow-init's
        # `users create` read it as an option (exit 2, seen in CI with a random token_urlsafe secret).
        "AIRFLOW_ADMIN_PASSWORD": "-" + secrets.token_urlsafe(18),
        **settings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, str(COMPOSE_DIR / "new-env.py"), "--out", str(path),
                        *(f"{k}={v}" for k, v in overrides.items())], capture_output=True, text=True)
    if r.returncode != 0:
        raise StackError(r.stderr.strip())
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@contextmanager
def running_stack(docker_env: dict[str, str], env_dir: Path, **settings: str) -> Iterator[Stack]:
    """docker-compose.yml up with a fresh .env (``settings`` on top), healthy; down with its volumes after
    (``HEADAVATAR_COMPOSE_KEEP_LOGS=1`` prints the services' logs first)."""
    socket_path = Path(docker_env["DOCKER_HOST"].removeprefix("unix://"))
    if not socket_path.is_socket():
        raise StackError(f"compose needs a unix-socket engine, not {docker_env['DOCKER_HOST']}")
    build_compose_images(env=docker_env)  # as `make images-compose` (cached)
    build_images(env=docker_env)  # the stage images, as `make images` (cached)
    project = f"hacompose{secrets.token_hex(3)}"
    values = write_env_file(env_dir / ".env", socket_path, project, **settings)
    host = values.get("HEADAVATAR_BIND", "127.0.0.1")
    st = Stack(project, env_dir / ".env", values, docker_env,
               airflow=f"http://{host}:{values['HEADAVATAR_AIRFLOW_PORT']}",
               mlflow=f"http://{host}:{values['HEADAVATAR_MLFLOW_PORT']}",
               s3=f"http://{host}:{values['HEADAVATAR_S3_PORT']}")
    started = time.monotonic()
    try:
        up = st.compose("up", "-d", check=False)
        if up.returncode != 0:  # an init step failed: its own words say why
            logs = st.compose("logs", "--no-color", "--tail", "60", "airflow-init", "s3-init", "mlflow-init",
                              check=False).stdout
            raise StackError(f"compose up failed:\n{up.stderr[-2000:]}\n{logs[-6000:]}")
        wait_for("Airflow api-server", lambda: requests.get(f"{st.airflow}/api/v2/monitor/health", timeout=5).ok, 600)

        def all_healthy() -> bool:
            health = requests.get(f"{st.airflow}/api/v2/monitor/health", timeout=5).json()
            return all(health.get(c, {}).get("status") == "healthy"
                       for c in ("metadatabase", "scheduler", "dag_processor", "triggerer"))

        wait_for("Airflow scheduler, dag-processor and triggerer", all_healthy, 300)
        wait_for("MLflow", lambda: requests.get(f"{st.mlflow}/health", timeout=5).ok, 300)
        print(f"compose stack healthy {time.monotonic() - started:.0f} s after `up`", file=sys.stderr)
        yield st
    finally:
        if os.environ.get("HEADAVATAR_COMPOSE_KEEP_LOGS"):
            print(st.compose("logs", "--no-color", check=False).stdout[-20000:], file=sys.stderr)
        st.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        remove_stage_leftovers(docker_env, "headavatar")  # the central file's network (its stage containers')


def remove_stage_leftovers(docker_env: dict[str, str], network: str) -> None:
    """Stage containers still running when their scheduler or worker stopped (a failed or cut-short run, a
    comparison retrying MLflow) outlive `down` and keep the network: they, their scratch volumes and the
    network go."""
    def docker(*args: str) -> list[str]:
        return subprocess.run(["docker", *args], env=docker_env, capture_output=True, text=True).stdout.split()

    containers = docker("ps", "-aq", "--filter", f"network={network}")
    if containers:
        volumes = [v for c in containers for v in docker("inspect", "-f", "{{range .Mounts}}{{.Name}} {{end}}", c)]
        docker("rm", "-f", "-v", *containers)
        if volumes:
            docker("volume", "rm", "-f", *volumes)
    docker("network", "rm", network)


def bridge_address(env: dict[str, str]) -> str:
    """The host's address on Docker's default bridge: what containers of any network reach this machine at.

    The bridge's IPAM gateway where the engine reports one; Debian's Docker 20.10 has been seen to report a
    subnet only, and then it is the address of the bridge's interface (``com.docker.network.bridge.name``,
    docker0), read on this host (the engine runs here)."""
    out = subprocess.run(["docker", "network", "inspect", "bridge", "-f",
                          '{{(index .IPAM.Config 0).Gateway}} {{index .Options "com.docker.network.bridge.name"}}'],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    if out and out[0][0].isdigit():
        return out[0]
    if out:
        try:
            return _interface_ipv4(out[-1])
        except OSError as e:
            raise StackError(f"the default bridge network has no gateway, and its interface {out[-1]}: {e}") from None
    raise StackError("the default bridge network has no gateway")


def _interface_ipv4(name: str) -> str:
    """A network interface's IPv4 address on this host (SIOCGIFADDR)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
    return socket.inet_ntoa(packed[20:24])


def celery_settings(bridge: str, host_gpus: int, gpus: int, **settings: str) -> dict[str, str]:
    """The central host's .env settings for the `celery` profile: its own workers are host "a" with device 0
    (leased without a GPU request here), published on ``bridge`` for the added hosts; ``gpus`` sizes the pool."""
    return {"COMPOSE_PROFILES": "celery", "AIRFLOW_EXECUTOR": "CeleryExecutor", "HEADAVATAR_HOST": "a",
            "HEADAVATAR_GPU_DEVICES": "0", "HEADAVATAR_HOST_GPUS": str(host_gpus), "HEADAVATAR_GPUS": str(gpus),
            "HEADAVATAR_BIND": bridge, "HEADAVATAR_CENTRAL": bridge, **settings}


class WorkerHost:
    """An added host: docker-compose.worker.yml under its own project and network, with the worker env file
    new-env.py --worker-of writes from the central one. Its GPU is device 0, its worker takes ``gpu_tasks``."""

    def __init__(self, central: Stack, env_dir: Path, name: str, gpu_tasks: int = 2):
        self.central, self.name, self.project = central, name, f"{central.project}{name}"
        self.env_file = env_dir / f"worker-{name}.env"
        r = subprocess.run([sys.executable, str(COMPOSE_DIR / "new-env.py"), "--worker-of", str(central.env_file),
                            "--out", str(self.env_file), f"HEADAVATAR_HOST={name}",
                            f"COMPOSE_PROJECT_NAME={self.project}", f"HEADAVATAR_NETWORK={self.project}",
                            "HEADAVATAR_GPU_DEVICES=0", f"HEADAVATAR_HOST_GPUS={gpu_tasks}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(r.stderr.strip())

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*compose_command(), "-f", str(WORKER_FILE), "--env-file", str(self.env_file),
                            "-p", self.project, *args],
                           env=self.central.docker_env, capture_output=True, text=True, timeout=600)
        if check and r.returncode != 0:
            raise StackError(f"host {self.name}: {args[0]}:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        return r

    def down(self) -> None:
        """Its workers gone with their volumes, and any stage container they left running."""
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        remove_stage_leftovers(self.central.docker_env, self.project)

    @contextmanager
    def running(self) -> Iterator[WorkerHost]:
        self.compose("up", "-d")
        try:
            yield self
        finally:
            self.down()

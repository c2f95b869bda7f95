"""What the demo entry points share: the bucket, the Airflow environment and the demo home's state.

``make demo`` (demo.py) and ``make demo-ui`` (airflow_ui.py) both use these, so neither imports the other.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from headavatar.devserver.seaweed import _is_free, free_port

BUCKET = "headavatar"
REPO = Path(__file__).resolve().parents[3]  # a source checkout: dags/ and plugins/ live beside tasks/

def airflow_env(home: Path, s3: dict[str, str], mlflow_uri: str, backend: str = "local",
                docker_host: str | None = None, stage_image: str | None = None) -> dict[str, str]:
    """A self-contained Airflow (SQLite under ``home``) whose connections point at the embedded services;
    on ``docker`` the stage containers use the host network (the services listen on 127.0.0.1) and the
    CPU stage image for stages 3-6, or ``stage_image`` (the CUDA image's smoke test runs it on the CPU)."""
    env = {
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "tasks")]),
        "HEADAVATAR_EXECUTION": backend,
        # `make demo`'s `airflow dags test` records the DAGs in the metadata DB that `make demo-ui` serves:
        # unpaused, as docs/ui.md says, so ingestion and comparison run there on their own.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW_CONN_HEADAVATAR_S3": json.dumps({
            "conn_type": "aws", "login": s3["AWS_ACCESS_KEY_ID"], "password": s3["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3["HEADAVATAR_S3_ENDPOINT"], "bucket": BUCKET, "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_HEADAVATAR_MLFLOW": json.dumps({"conn_type": "http", "extra": {"tracking_uri": mlflow_uri}}),
    }
    if backend == "docker":
        from headavatar.devserver.images import cpu_image, preprocess_image

        env.update({"HEADAVATAR_DOCKER_URL": docker_host or "unix://var/run/docker.sock",
                    "HEADAVATAR_DOCKER_NETWORK": "host", "HEADAVATAR_DOCKER_GPUS": "0",
                    "HEADAVATAR_CPU_IMAGE": preprocess_image(), "HEADAVATAR_CUDA_IMAGE": stage_image or cpu_image()})
    return env


def write_s3_env(home: Path, s3: dict[str, str]) -> Path:
    """``<home>/s3.env`` (mode 0600): ``export`` lines of the demo's S3 endpoint, bucket and key pair, for
    ``source`` before ``headavatar status``/``costs``; the same values every start (``state.json``)."""
    path = home / "s3.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"export {k}={v}\n" for k, v in sorted({**s3, "HEADAVATAR_S3_BUCKET": BUCKET}.items()))
    return path


def load_state(home: Path) -> dict[str, Any]:
    """Credentials and ports of one demo home, generated on first use (``state.json``, mode 0600)."""
    path = home / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e}); delete it to generate new credentials") from None
    if not isinstance(state, dict) or not isinstance(state.get("ports", {}), dict):
        raise ValueError(f"{path}: expected an object with a 'ports' object; delete it to generate new credentials")
    fresh = {"s3_access_key": "AK" + secrets.token_hex(8).upper(), "s3_secret_key": secrets.token_urlsafe(30),
             "airflow_password": secrets.token_urlsafe(12), "jwt_secret": secrets.token_urlsafe(32),
             "api_secret_key": secrets.token_urlsafe(32), "ports": {}}
    if any(k not in state for k in fresh):
        state = {**fresh, **state}
        save_state(home, state)
    return state


def save_state(home: Path, state: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "state.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    path.chmod(0o600)


def _port(state: dict[str, Any], name: str, preferred: int = 0) -> int:
    """The port this home used last time (or ``preferred``) when it is still free, else a new free one."""
    for candidate in (state["ports"].get(name), preferred):
        if candidate and _is_free(candidate) and (name != "s3" or _is_free(candidate + 10000)):
            return candidate
    return free_port()

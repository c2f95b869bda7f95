"""Writes a .env for the compose stack: .env.example with a fresh random secret for every ``change-me``
and DOCKER_GID read from the Docker socket. Settings given as arguments (``KEY=VALUE``) replace the
example's. The file is created with mode 0600 and never overwritten. Standard library only, so it runs
before anything is installed.

    python3 infra/compose/new-env.py --out infra/compose/.env [KEY=VALUE ...]

With ``--worker-of CENTRAL_ENV``: the env file of an added GPU host (docker-compose.worker.yml), only the
settings a worker needs (WORKER_KEYS) taken from the central host's file, DOCKER_GID read here.

    python3 infra/compose/new-env.py --worker-of central.env --out worker.env HEADAVATAR_HOST=gpu2 ...
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
from pathlib import Path

EXAMPLE = Path(__file__).with_name(".env.example")


def secret(key: str) -> str:
    if key == "AIRFLOW_FERNET_KEY":  # a Fernet key: 32 random bytes, URL-safe base64
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    while not (value := secrets.token_urlsafe(24))[0].isalnum():  # "-x..." reads as an option on command lines
        pass
    return value


def new_env(overrides: dict[str, str]) -> str:
    gid_given = "DOCKER_GID" in overrides
    lines, values = [], {}
    for line in EXAMPLE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if line.startswith("#") or not sep:
            lines.append(line)
            continue
        value = overrides.pop(key, secret(key) if value == "change-me" else value)
        values[key] = value
        lines.append(f"{key}={value}")
    socket = Path(values.get("DOCKER_SOCKET", "/var/run/docker.sock"))
    if not gid_given and socket.exists():
        lines = [f"DOCKER_GID={socket.stat().st_gid}" if ln.startswith("DOCKER_GID=") else ln for ln in lines]
    lines += [f"{k}={v}" for k, v in overrides.items()]  # settings the example does not list
    return "\n".join(lines) + "\n"


# What an added host's workers need from the central host's env file: no admin credential, no key of
# another S3 identity, no MLflow database password.
WORKER_KEYS = (
    "COMPOSE_PROJECT_NAME", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
    "S3_STAGES_ACCESS_KEY", "S3_STAGES_SECRET_KEY", "S3_INGEST_ACCESS_KEY", "S3_INGEST_SECRET_KEY",
    "MLFLOW_PIPELINE_USER", "MLFLOW_PIPELINE_PASSWORD", "HEADAVATAR_BUCKET", "HEADAVATAR_MLFLOW_UI_URL",
    "HEADAVATAR_CENTRAL", "HEADAVATAR_AIRFLOW_PORT", "HEADAVATAR_MLFLOW_PORT", "HEADAVATAR_S3_PORT",
    "HEADAVATAR_POSTGRES_PORT", "HEADAVATAR_REDIS_PORT", "HEADAVATAR_CPU_IMAGE", "HEADAVATAR_CUDA_IMAGE",
    "HEADAVATAR_DOCKER_GPUS", "HEADAVATAR_GPU_DEVICES", "HEADAVATAR_HOST_GPUS", "HEADAVATAR_INGEST_PARAMS",
    "DOCKER_SOCKET")


def worker_env(central: str, overrides: dict[str, str]) -> str:
    values = {}
    for line in central.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and key in WORKER_KEYS:
            values[key] = value
    values.update(overrides)
    if "HEADAVATAR_HOST" not in values:
        raise ValueError("name this host: HEADAVATAR_HOST=<name> (its GPU queue is gpu.<name>)")
    socket = Path(values.get("DOCKER_SOCKET", "/var/run/docker.sock"))
    if "DOCKER_GID" not in overrides and socket.exists():
        values["DOCKER_GID"] = str(socket.stat().st_gid)
    return "".join(f"{k}={v}\n" for k, v in values.items())


def main(argv: list[str]) -> int:
    central = None
    if len(argv) >= 2 and argv[0] == "--worker-of":
        central, argv = Path(argv[1]), argv[2:]
    if len(argv) < 2 or argv[0] != "--out":
        print("usage: new-env.py [--worker-of CENTRAL_ENV] --out PATH [KEY=VALUE ...]", file=sys.stderr)
        return 2
    out, argv = Path(argv[1]), argv[2:]
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"new-env.py: {arg!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = value
    try:
        text = new_env(overrides) if central is None else worker_env(central.read_text(), overrides)
    except (OSError, ValueError) as e:
        print(f"new-env.py: {e}", file=sys.stderr)
        return 2
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
    except FileExistsError:
        print(f"new-env.py: {out} exists; remove it first to start with new secrets", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"new-env.py: wrote {out} (mode 0600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

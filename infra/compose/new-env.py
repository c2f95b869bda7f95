"""Prints a .env for the compose stack: .env.example with a fresh random secret for every ``change-me``
and DOCKER_GID read from the Docker socket. Settings given as arguments (``KEY=VALUE``) replace the
example's. Standard library only, so it runs before anything is installed.

    python3 infra/compose/new-env.py > infra/compose/.env && chmod 600 infra/compose/.env
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
    return secrets.token_urlsafe(24)


def new_env(overrides: dict[str, str]) -> str:
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
    if "DOCKER_GID" not in overrides and socket.exists():
        lines = [f"DOCKER_GID={socket.stat().st_gid}" if ln.startswith("DOCKER_GID=") else ln for ln in lines]
    overrides.pop("DOCKER_GID", None)
    lines += [f"{k}={v}" for k, v in overrides.items()]  # settings the example does not list
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"new-env.py: {arg!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = value
    sys.stdout.write(new_env(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

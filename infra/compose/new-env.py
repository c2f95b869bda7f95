"""Writes a .env for the compose stack: .env.example with a fresh random secret for every ``change-me``
and DOCKER_GID read from the Docker socket. Settings given as arguments (``KEY=VALUE``) replace the
example's. The file is created with mode 0600 and never overwritten. Standard library only, so it runs
before anything is installed.

    python3 infra/compose/new-env.py --out infra/compose/.env [KEY=VALUE ...]
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


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--out":
        print("usage: new-env.py --out PATH [KEY=VALUE ...]", file=sys.stderr)
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
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
    except FileExistsError:
        print(f"new-env.py: {out} exists; remove it first to start with new secrets", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(new_env(overrides))
    print(f"new-env.py: wrote {out} (mode 0600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

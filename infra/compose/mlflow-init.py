"""mlflow-init: the stages' MLflow user, who is not an admin.

The admin (MLFLOW_ADMIN_USER, created by the server on its first start) creates MLFLOW_PIPELINE_USER,
or sets its password to MLFLOW_PIPELINE_PASSWORD when it exists (a changed .env takes effect on the next
`up`), and takes its admin flag away if someone gave it one. Then the pipeline user's own credentials
are tried: they must sign in, and asking the server for a new user must be refused (403). Anything else
exits 1 or 2 with one line, and `up` stops before Airflow starts. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("MLFLOW_URL", "http://mlflow:5000").rstrip("/")
USERS = f"{URL}/api/2.0/mlflow/users"


def call(method: str, url: str, user: str, password: str, body: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:  # not answering yet
        return 0, {}


def main() -> int:
    admin = (os.environ["MLFLOW_ADMIN_USER"], os.environ["MLFLOW_ADMIN_PASSWORD"])
    name, password = os.environ["MLFLOW_PIPELINE_USER"], os.environ["MLFLOW_PIPELINE_PASSWORD"]
    if name == admin[0]:
        print("mlflow-init: MLFLOW_PIPELINE_USER must differ from MLFLOW_ADMIN_USER", file=sys.stderr)
        return 2
    deadline = time.monotonic() + 120
    while True:  # the admin is created by the server's first start, which may still be under way
        status, got = call("GET", f"{USERS}/get?username={name}", *admin)
        if status in (200, 404) or time.monotonic() > deadline:
            break
        time.sleep(2)
    if status == 404:
        status, _ = call("POST", f"{USERS}/create", *admin, {"username": name, "password": password})
        what = "created"
    elif status == 200:
        status, _ = call("PATCH", f"{USERS}/update-password", *admin, {"username": name, "password": password})
        if status == 200 and got["user"].get("is_admin"):
            status, _ = call("PATCH", f"{USERS}/update-admin", *admin, {"username": name, "is_admin": False})
        what = "updated"
    if status != 200:
        print(f"mlflow-init: {URL} answered {status} to the admin {admin[0]} managing user {name}", file=sys.stderr)
        return 1
    status, _ = call("GET", f"{USERS}/current", name, password)
    if status != 200:
        print(f"mlflow-init: the pipeline user {name} cannot sign in ({status})", file=sys.stderr)
        return 2
    probe = f"mlflow-init-probe-{secrets.token_hex(4)}"
    status, _ = call("POST", f"{USERS}/create", name, password, {"username": probe, "password": secrets.token_hex(16)})
    if status != 403:
        print(f"mlflow-init: the pipeline user {name} may create users ({status}): it must not be an admin",
              file=sys.stderr)
        return 2
    print(f"mlflow-init: pipeline user {name} {what}; not an admin")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""mlflow-init: the stages' MLflow user, who is not an admin.

The admin (MLFLOW_ADMIN_USER, created by the server on its first start) creates MLFLOW_PIPELINE_USER,
or sets its password to MLFLOW_PIPELINE_PASSWORD when it exists (a changed .env takes effect on the next
`up`), and takes its admin flag away if someone gave it one. What an earlier stack logged as the admin
(the ``headavatar`` experiment, the ``headavatar-<id>`` registered models) is granted to the pipeline user
(MANAGE), so an upgraded install keeps tracking into them. Then the pipeline user's own credentials are
tried: they must sign in, and asking the server for a new user must be refused (403). Anything else exits
1 or 2 with one line, and `up` stops before Airflow starts. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

URL = os.environ.get("MLFLOW_URL", "http://mlflow:5000").rstrip("/")
USERS = f"{URL}/api/2.0/mlflow/users"
# What the stages log into (headavatar.tracking: HEADAVATAR_MLFLOW_EXPERIMENT, HEADAVATAR_MLFLOW_MODEL_PREFIX).
EXPERIMENT = os.environ.get("HEADAVATAR_MLFLOW_EXPERIMENT") or "headavatar"
MODEL_PREFIX = os.environ.get("HEADAVATAR_MLFLOW_MODEL_PREFIX") or "headavatar-"


def call(method: str, url: str, user: str, password: str, body: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except OSError:  # not answering yet
        return 0, {}


def grant_existing(admin: tuple[str, str], name: str) -> int | str:
    """MANAGE for ``name`` on the experiment and registered models that exist already; how many, or what failed."""
    targets = []
    status, got = call("GET", f"{URL}/api/2.0/mlflow/experiments/get-by-name?"
                       + urllib.parse.urlencode({"experiment_name": EXPERIMENT}), *admin)
    if status == 200:
        targets.append(("experiment", got["experiment"]["experiment_id"]))
    query = urllib.parse.urlencode({"filter": f"name LIKE '{MODEL_PREFIX}%'", "max_results": 1000})
    status, got = call("GET", f"{URL}/api/2.0/mlflow/registered-models/search?{query}", *admin)
    if status != 200:
        return f"{URL} answered {status} to the admin listing registered models"
    targets += [("registered_model", m["name"]) for m in got.get("registered_models", [])]
    for kind, resource in targets:
        status, got = call("POST", f"{URL}/api/3.0/mlflow/users/permissions/grant", *admin,
                           {"username": name, "resource_type": kind, "resource_id": resource, "permission": "MANAGE"})
        if status != 200 and got.get("error_code") != "RESOURCE_ALREADY_EXISTS":
            return f"{URL} answered {status} to granting {name} MANAGE on {kind} {resource}: {got.get('message', '')}"
    return len(targets)


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
    granted = grant_existing(admin, name)
    if isinstance(granted, str):
        print(f"mlflow-init: {granted}", file=sys.stderr)
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
    print(f"mlflow-init: pipeline user {name} {what}; not an admin; MANAGE on {granted} earlier resource(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

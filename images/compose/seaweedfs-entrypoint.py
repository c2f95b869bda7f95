"""Starts SeaweedFS with the S3 identities of the environment, each limited by its IAM policy.

Identities: S3_ADMIN_USER/S3_ADMIN_PASSWORD (admin: creates the bucket, uploads assets), and one per
policy file ``<name>.json`` in S3_POLICIES (infra/policies: ingest, stages, readonly, mlflow), with
the keys S3_<NAME>_ACCESS_KEY/S3_<NAME>_SECRET_KEY. A policy's Allow statements are translated into
SeaweedFS actions on the same prefixes, its bucket name replaced by BUCKET; an action SeaweedFS has no
equivalent for stops the start. No anonymous identity: unsigned requests get 403. The identity file is
written to a private temporary directory, never to the data volume or the log.

Every SeaweedFS port listens on the container's loopback only, because the S3 gateway's gRPC port (which
can reconfigure identities, unauthenticated) would otherwise follow the S3 port onto the network; socat
forwards :9000 to the S3 HTTP port alone. The container ends when either process does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

S3_PORT = 8333  # on 127.0.0.1; :9000 is the forwarder

ACTIONS = {  # S3 API action -> SeaweedFS identity action
    "s3:GetObject": "Read", "s3:PutObject": "Write", "s3:DeleteObject": "Write",
    "s3:AbortMultipartUpload": "Write", "s3:ListMultipartUploadParts": "Write",
    "s3:ListBucket": "List", "s3:GetBucketLocation": "List", "s3:ListBucketMultipartUploads": "List",
}


def policy_actions(policy: dict, bucket: str, source: Path) -> list[str]:
    """``Read:bucket/prefix/*``-style actions granting what the policy's Allow statements grant."""
    out: set[str] = set()
    for st in policy["Statement"]:
        if st.get("Effect") != "Allow" or "Condition" in st or "NotAction" in st or "NotResource" in st:
            # SeaweedFS grants actions and nothing else: a statement it cannot express must not be dropped.
            raise SystemExit(f"{source}: statement {st.get('Sid', '?')}: only plain Allow statements can be "
                             "expressed as SeaweedFS actions")
        for action in st["Action"]:
            if action not in ACTIONS:
                raise SystemExit(f"{source}: action {action} has no SeaweedFS equivalent")
            for res in st["Resource"]:
                target = res.removeprefix("arn:aws:s3:::").replace("headavatar", bucket, 1)
                out.add(f"{ACTIONS[action]}:{target}")
    return sorted(out)


def require(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        print(f"seaweedfs-entrypoint: environment variable {name} is not set", file=sys.stderr)
        sys.exit(2)
    return value


def identities(bucket: str) -> list[dict]:
    out = [{"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": require("S3_ADMIN_USER"), "secretKey": require("S3_ADMIN_PASSWORD")}]}]
    policies = sorted(Path(require("S3_POLICIES")).glob("*.json"))
    if not policies:
        print(f"seaweedfs-entrypoint: no <identity>.json policy in {os.environ['S3_POLICIES']}", file=sys.stderr)
        sys.exit(2)
    for path in policies:
        name = path.stem
        actions = policy_actions(json.loads(path.read_text()), bucket, path)
        key = f"S3_{name.upper()}"
        out.append({"name": name, "actions": actions, "credentials": [
            {"accessKey": require(f"{key}_ACCESS_KEY"), "secretKey": require(f"{key}_SECRET_KEY")}]})
        print(f"seaweedfs-entrypoint: {name} may {', '.join(actions)}", flush=True)
    return out


def main() -> None:
    bucket = os.environ.get("BUCKET") or "headavatar"
    users = identities(bucket)
    conf_dir = tempfile.mkdtemp(prefix="s3-")
    conf = os.path.join(conf_dir, "identities.json")
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": users}, f)
    weed = subprocess.Popen([
        "weed", "server", "-dir=/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-s3", f"-s3.port={S3_PORT}", f"-s3.config={conf}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-master.telemetry=false"])
    forward = subprocess.Popen(["socat", "TCP-LISTEN:9000,fork,reuseaddr", f"TCP:127.0.0.1:{S3_PORT}"])
    children = (weed, forward)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: [c.terminate() for c in children if c.poll() is None])
    _, status = os.wait()  # the first child to end ends the container
    for c in children:
        if c.poll() is None:
            c.terminate()
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
    sys.exit(os.waitstatus_to_exitcode(status) or 1)


if __name__ == "__main__":
    main()

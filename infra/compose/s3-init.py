"""s3-init: the bucket, created by the admin, and proof that every identity has the rights its policy
gives and no others.

Retries until the object store takes writes (its volume servers join after the gateway answers). Then,
for each policy ``<name>.json`` in S3_POLICIES (keys S3_<NAME>_ACCESS_KEY/S3_<NAME>_SECRET_KEY) and each
prefix the pipeline uses, a probe object is read and written as that identity: the store must allow
exactly what the policy's Allow statements name (``s3:GetObject``, ``s3:PutObject``) and refuse the
rest with AccessDenied. Any difference exits 2 with one line naming the identity, the action and the key,
so `up` stops before Airflow or MLflow start on a store that does not enforce the policies. It reads the
policies itself (``granted``), apart from the store's entrypoint that translates them, so a mistake in
that translation is caught here instead of repeated. The policies name the prefix ``nersemble/`` (the
default ``storage.prefix``); a deployment with another prefix edits them and PREFIXES below.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINT = os.environ.get("S3_ENDPOINT", "http://s3:9000")
# Every top-level folder the pipeline writes or reads (headavatar.layout, assets, ingestion, MLflow).
PREFIXES = ("nersemble/raw/", "nersemble/ingest/", "nersemble/avatars/", "nersemble/assets/",
            "nersemble/synthetic_ground_truth/", "mlflow/")
PROBE = ".s3-init-probe"


def client(key: str, secret: str) -> Any:
    return boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))


def granted(policy: dict, action: str, bucket: str, key: str) -> bool:
    """Whether an Allow statement of the policy names ``action`` on ``bucket/key`` (no Deny is used)."""
    arn = f"arn:aws:s3:::{bucket}/{key}"
    return any(st.get("Effect") == "Allow" and action in st["Action"]
               and any(fnmatch.fnmatchcase(arn, r.replace("headavatar", bucket, 1)) for r in st["Resource"])
               for st in policy["Statement"])


def allowed(call: Any) -> bool:
    try:
        call()
        return True
    except ClientError as e:
        if e.response["Error"]["Code"] in ("AccessDenied", "403"):
            return False
        raise


def wait_for_writes(admin: Any, bucket: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            try:
                admin.create_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
            for prefix in PREFIXES:
                admin.put_object(Bucket=bucket, Key=prefix + PROBE, Body=b"probe")
            return
        except Exception as e:  # the store is still starting
            if time.monotonic() > deadline:
                raise SystemExit(f"s3-init: {ENDPOINT} takes no writes after 120 s: {e}") from e
            time.sleep(1)


def check(name: str, policy: dict, user: Any, bucket: str) -> list[str]:
    wrong = []
    for key in (prefix + PROBE for prefix in PREFIXES):
        calls = {"s3:GetObject": lambda k=key: user.get_object(Bucket=bucket, Key=k)["Body"].read(),
                 "s3:PutObject": lambda k=key: user.put_object(Bucket=bucket, Key=k, Body=b"probe")}
        for action, call in calls.items():
            want, got = granted(policy, action, bucket, key), allowed(call)
            if want != got:
                wrong.append(f"{name} {'may' if got else 'may not'} {action} {bucket}/{key}, "
                             f"its policy says {'yes' if want else 'no'}")
    return wrong


def main() -> int:
    bucket = os.environ.get("BUCKET") or "headavatar"
    admin = client(os.environ["S3_ADMIN_USER"], os.environ["S3_ADMIN_PASSWORD"])
    wait_for_writes(admin, bucket)
    wrong: list[str] = []
    policies = sorted(Path(os.environ.get("S3_POLICIES", "/policies")).glob("*.json"))
    for path in policies:
        key = f"S3_{path.stem.upper()}"
        user = client(os.environ[f"{key}_ACCESS_KEY"], os.environ[f"{key}_SECRET_KEY"])
        wrong += check(path.stem, json.loads(path.read_text()), user, bucket)
    for prefix in PREFIXES:
        admin.delete_object(Bucket=bucket, Key=prefix + PROBE)
    if wrong:
        print(f"s3-init: the store does not enforce the policies: {'; '.join(wrong)}", file=sys.stderr)
        return 2
    print(f"s3-init: bucket {bucket} ready; {', '.join(p.stem for p in policies)} limited to their policies")
    return 0


if __name__ == "__main__":
    sys.exit(main())

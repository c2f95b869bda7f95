"""minio-init of docker-compose.local.yml: the bucket, created by the admin, and a check of both identities.

Retries until the object store takes writes (its volume servers join after the gateway answers), then
proves what the stack relies on: the pipeline user writes under mlflow/ and is refused outside its
prefixes. Exit 2 with one line when an identity does not behave as configured.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINT = os.environ.get("S3_ENDPOINT", "http://minio:9000")


def client(key: str, secret: str) -> Any:
    return boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))


def main() -> int:
    bucket = os.environ.get("BUCKET") or "headavatar"
    admin = client(os.environ["MINIO_ROOT_USER"], os.environ["MINIO_ROOT_PASSWORD"])
    pipeline = client(os.environ["S3_ACCESS_KEY"], os.environ["S3_SECRET_KEY"])
    deadline = time.monotonic() + 120
    while True:
        try:
            try:
                admin.create_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
            pipeline.put_object(Bucket=bucket, Key="mlflow/.init-probe", Body=b"ok")
            pipeline.delete_object(Bucket=bucket, Key="mlflow/.init-probe")
            break
        except Exception as e:  # the store is still starting
            if time.monotonic() > deadline:
                print(f"s3-init: {ENDPOINT} takes no writes after 120 s: {e}", file=sys.stderr)
                return 1
            time.sleep(1)
    try:
        pipeline.put_object(Bucket=bucket, Key="outside-the-policy", Body=b"x")
    except ClientError as e:
        if e.response["Error"]["Code"] != "AccessDenied":
            raise
    else:
        print("s3-init: the pipeline user may write outside its prefixes (S3_POLICY not applied)", file=sys.stderr)
        return 2
    print(f"s3-init: bucket {bucket} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())

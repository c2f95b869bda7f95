"""A real ``mlflow server`` on 127.0.0.1 for the embedded default and the tests.

SQLite backend store under ``data_dir``; artifacts proxied by the server into the project's S3
bucket (``s3://<bucket>/mlflow``), so clients need no S3 credentials of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from headavatar.devserver.seaweed import free_port


class EmbeddedMLflow:
    def __init__(self, data_dir: Path, s3_env: dict[str, str], bucket: str):
        self.data_dir = Path(data_dir)
        self.s3_env, self.bucket = s3_env, bucket
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()  # a caller may pin it (stable URLs across restarts)
        env = {**os.environ, **self.s3_env, "MLFLOW_S3_ENDPOINT_URL": self.s3_env["HEADAVATAR_S3_ENDPOINT"]}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{self.bucket}/mlflow"]
        log = open(self.data_dir / "mlflow.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.data_dir / 'mlflow.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server's gunicorn/uvicorn workers go with it
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

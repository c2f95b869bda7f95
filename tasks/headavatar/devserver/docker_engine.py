"""A Docker engine of the project's own, for the demo, the tests and CI on a machine without one running.

``dockerd`` is started by hand (no systemd on the development machines) with every path inside
``home``: data root (images and build cache, kept between runs so images are built once), exec
root, pid file and socket. A second caller finds the engine already answering and reuses it
instead of starting another on the same data root; only the process that started the engine
stops it, by PID.

Install the engine with ``make docker-engine`` (Debian's ``docker.io`` where apt-get is usable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_HOME = Path(".headavatar/docker")


class DockerEngineError(RuntimeError):
    pass


class DockerEngine:
    """``with DockerEngine(home) as engine:`` -> ``engine.url`` (``unix://...``) answers the Docker API."""

    def __init__(self, home: Path = DEFAULT_HOME, storage_driver: str = "overlay2") -> None:
        self.home = home.resolve()
        self.storage_driver = storage_driver
        self.socket = self.home / "run" / "docker.sock"
        self.pidfile = self.home / "run" / "dockerd.pid"
        self.logfile = self.home / "dockerd.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for the ``docker`` CLI and docker-py (``DOCKER_HOST``); the classic builder,
        which needs no BuildKit frontend image from a registry."""
        return {"DOCKER_HOST": self.url, "DOCKER_BUILDKIT": "0"}

    def answers(self) -> bool:
        docker = shutil.which("docker")
        if docker is None or not self.socket.exists():
            return False
        return subprocess.run([docker, "-H", self.url, "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, timeout=20).returncode == 0

    def start(self, timeout: float = 60) -> DockerEngine:
        if self.answers():
            log.info("docker engine already running at %s", self.url)
            return self
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise DockerEngineError("dockerd not found: run `make docker-engine` (Debian's docker.io) first")
        self._stop_stale()
        (self.home / "run").mkdir(parents=True, exist_ok=True)
        cmd = [dockerd, f"--data-root={self.home / 'data'}", f"--exec-root={self.home / 'exec'}",
               f"--pidfile={self.pidfile}", f"-H={self.url}", f"--storage-driver={self.storage_driver}",
               "--log-level=warn"]
        with open(self.logfile, "ab") as logf:
            self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._proc.poll() is not None:
                raise DockerEngineError(f"dockerd exited with {self._proc.returncode}; see {self.logfile}")
            if time.monotonic() > deadline:
                self.stop()
                raise DockerEngineError(f"dockerd did not answer within {timeout:.0f} s; see {self.logfile}")
            time.sleep(0.2)
        log.info("docker engine started at %s (pid %d)", self.url, self._proc.pid)
        return self

    def _stop_stale(self) -> None:
        """A dockerd killed without cleanup leaves its pid file; a live process there that does not
        answer would hold the data root, so it is stopped. Only if it is this engine's dockerd: after a
        reboot the pid may be another process's."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if self._is_ours(pid):
            _terminate(pid, 20)
        else:
            log.info("pid file %s names process %d, not this engine's dockerd: left alone", self.pidfile, pid)
        self.pidfile.unlink(missing_ok=True)

    def _is_ours(self, pid: int) -> bool:
        """Whether process ``pid`` is a dockerd started with this engine's pid file."""
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        return any(Path(a).name == "dockerd" for a in args) and f"--pidfile={self.pidfile}" in args

    def stop_detached(self) -> None:
        """Stops the engine another process started (``start`` for make targets and CI), by its pid file,
        and unmounts what it left under the exec root, as :meth:`stop` does for an engine of its own."""
        self._stop_stale()
        self._unmount_leftovers()

    def stop(self) -> None:
        """Stops the engine if this object started it (containers it still runs are stopped by dockerd)."""
        if self._proc is None:
            return
        self._proc.terminate()  # dockerd stops its containers and containerd, then exits (about 1 s)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its default network namespace mounted under the exec root (nsfs), which
        keeps ``rm -rf .headavatar`` (``make clean``) from removing it."""
        exec_root = str(self.home / "exec") + "/"
        try:
            mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        except OSError:
            return
        for point in sorted((m for m in mounts if m.startswith(exec_root)), reverse=True):
            r = subprocess.run(["umount", point], capture_output=True, text=True)
            if r.returncode:
                log.warning("could not unmount %s (rm -rf of %s will fail until it is): %s", point, self.home,
                            r.stderr.strip())

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """``python -m headavatar.devserver.docker_engine start|stop|env``: the engine for make targets and CI."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = DockerEngine(args.home)
    if args.action == "env":
        print(" ".join(f"{k}={v}" for k, v in engine.env().items()))
    elif args.action == "start":
        engine.start()
        engine._proc = None  # left running for the make targets that follow; `stop` ends it by PID
        print(json.dumps({"docker_host": engine.url, "pidfile": str(engine.pidfile)}))
    else:
        engine.stop_detached()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m headavatar.devserver.docker_engine stop`` (``make docker-engine-stop``, ``.ci/run``) on an engine
another process started: it ends the process in the pid file and leaves a home that ``rm -rf`` removes.

dockerd itself is not started here: a second engine beside the test session's would share its bridge.
The stand-ins are real: a process that waits for SIGTERM, and the network namespace bind mount (nsfs)
that dockerd leaves under its exec root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines())


def _reaped(cmd: list[str]) -> tuple[subprocess.Popen, threading.Thread]:
    """A process, reaped as it exits (a zombie would still answer kill(pid, 0))."""
    proc = subprocess.Popen(cmd)
    waiter = threading.Thread(target=proc.wait, daemon=True)
    waiter.start()
    return proc, waiter


def _stop(home: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "headavatar.devserver.docker_engine", "stop", "--home", str(home)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_stop_ends_the_engine_by_pid_and_unmounts_its_network_namespace(tmp_path: Path) -> None:
    home = tmp_path / "docker"
    netns = home / "exec" / "netns" / "default"
    pidfile = home / "run" / "dockerd.pid"
    netns.parent.mkdir(parents=True)
    pidfile.parent.mkdir()
    netns.touch()
    # What the engine's dockerd looks like in /proc: its name and this home's pid file among its arguments.
    engine, reaped = _reaped([sys.executable, "-c", "import time; time.sleep(600)", "dockerd", f"--pidfile={pidfile}"])
    try:
        subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(netns)], check=True)
        assert _mounted(netns)
        pidfile.write_text(f"{engine.pid}\n")
        _stop(home)
        reaped.join(10)
        assert engine.returncode == -15  # SIGTERM, as dockerd is asked to stop
        assert not _mounted(netns) and not pidfile.exists()
        shutil.rmtree(home)  # what `make clean` and removing a CI checkout do
    finally:
        if engine.poll() is None:
            engine.kill()
        if _mounted(netns):
            subprocess.run(["umount", str(netns)])


def test_a_stale_pid_file_naming_another_process_leaves_it_alone(tmp_path: Path) -> None:
    """After a reboot the pid in a leftover pid file may be anyone's: stop removes the file, not the process."""
    home = tmp_path / "docker"
    pidfile = home / "run" / "dockerd.pid"
    pidfile.parent.mkdir(parents=True)
    other, _ = _reaped(["sleep", "600"])
    try:
        pidfile.write_text(f"{other.pid}\n")
        _stop(home)
        assert other.poll() is None and not pidfile.exists()
    finally:
        other.kill()

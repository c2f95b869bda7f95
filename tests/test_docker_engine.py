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


def test_stop_ends_the_engine_by_pid_and_unmounts_its_network_namespace(tmp_path: Path) -> None:
    home = tmp_path / "docker"
    netns = home / "exec" / "netns" / "default"
    netns.parent.mkdir(parents=True)
    netns.touch()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(netns)], check=True)
    engine = subprocess.Popen(["sleep", "600"])
    reaped = threading.Thread(target=engine.wait, daemon=True)  # reaped as it exits: no zombie answers kill(pid, 0)
    reaped.start()
    try:
        (home / "run").mkdir()
        (home / "run" / "dockerd.pid").write_text(f"{engine.pid}\n")
        assert _mounted(netns)
        r = subprocess.run([sys.executable, "-m", "headavatar.devserver.docker_engine", "stop", "--home", str(home)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        reaped.join(10)
        assert engine.returncode == -15  # SIGTERM, as dockerd is asked to stop
        assert not _mounted(netns)
        shutil.rmtree(home)  # what `make clean` and removing a CI checkout do
    finally:
        if engine.poll() is None:
            engine.kill()
        if _mounted(netns):
            subprocess.run(["umount", str(netns)])

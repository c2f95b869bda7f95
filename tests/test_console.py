"""Never silent for long: the install's pip runs under heartbeat.py, the demo's phases and stages under the
console's heartbeat, with the latest progress read off the log (image build steps, training steps)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from headavatar.devserver.console import Console, LogTail

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = REPO / "tasks" / "headavatar" / "devserver" / "heartbeat.py"
QUIET_PIP = """
import sys, time
print("Collecting numpy==2.3.1"); print("Collecting scipy==1.16.0"); sys.stdout.flush()
time.sleep(3.6)  # pip installing, silent
print("Installing collected packages: numpy, scipy")
print("Successfully installed numpy-2.3.1 scipy-1.16.0")
sys.exit(int(sys.argv[1]))
"""


def test_heartbeat_speaks_while_the_command_is_silent_and_shows_the_tail_of_a_failure() -> None:
    ok = subprocess.run([sys.executable, str(HEARTBEAT), "--label", "pip", "--every", "1", "--",
                         sys.executable, "-c", QUIET_PIP, "0"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    beats = [line for line in lines if "2 packages collected, latest scipy==1.16.0; working" in line]
    assert len(beats) >= 2, lines  # 3.6 s of silence, a line every second or so
    assert lines[-2:] == ["  pip: Installing collected packages: numpy, scipy",
                          "  pip: Successfully installed numpy-2.3.1 scipy-1.16.0"]
    bad = subprocess.run([sys.executable, str(HEARTBEAT), "--label", "pip", "--every", "5", "--",
                          sys.executable, "-c", QUIET_PIP, "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3
    assert "Collecting numpy==2.3.1" in bad.stderr and "pip: failed (exit 3)" in bad.stderr


def test_a_quiet_phase_gets_lines_with_the_latest_progress_from_the_log(tmp_path: Path, capfd) -> None:
    log = tmp_path / "demo.log"
    console = Console(log, quiet_s=1.0)
    build = LogTail(log, r"Step (\d+)/(\d+) : (.{0,30})", lambda m: f"image build: step {m[1]}/{m[2]}: {m[3]}")
    with console.phase("images", "stage images", build):
        with open(log, "a") as f:  # what docker build writes into the log meanwhile
            f.write("Step 3/19 : RUN pip install torch\n")
        time.sleep(2.5)
    console.close()
    out = capfd.readouterr().out.splitlines()
    assert out[0].rstrip() == "  stage images"  # the phase's line, cut short by the first heartbeat
    assert any(line.startswith("    ... image build: step 3/19: RUN pip install torch (") for line in out), out
    assert out[-1].startswith("  stage images") and out[-1].rstrip().endswith(" s")  # restated with its time
    assert "image build: step 3/19" in log.read_text()  # the log has what the terminal had

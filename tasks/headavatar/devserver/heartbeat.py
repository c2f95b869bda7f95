"""Run a long, quiet command and say how it is going at least every ``--every`` seconds.

``make install`` runs pip through it: pip prints a line per package it collects and then nothing for
minutes while it installs. This prints how many packages are collected (and the latest), pip's
"Installing collected packages" step, a line whenever the command has been quiet for ``--every``
seconds, and, if the command fails, its last 40 lines. Standard library only: it runs before the venv has
anything installed (``python3 tasks/headavatar/devserver/heartbeat.py --label pip -- pip install ...``).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import threading
import time

COLLECTING = re.compile(r"^Collecting (\S+)")
SHOWN = re.compile(r"^(Installing collected packages|Successfully installed|ERROR|error:)")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what the command does, e.g. 'pip: the project'")
    parser.add_argument("--every", type=float, default=20.0, help="longest silence, seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    t0 = last = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    collected: list[str] = []
    lock = threading.Lock()

    def say(text: str) -> None:
        nonlocal last
        with lock:
            print(f"  {args.label}: {text}", flush=True)
            last = time.monotonic()

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if m := COLLECTING.match(line):
                collected.append(m.group(1))
            elif SHOWN.match(line):
                say(line if len(line) <= 110 else line[:107] + "...")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        time.sleep(min(1.0, args.every))
        if time.monotonic() - last >= args.every:
            latest = f"{len(collected)} packages collected, latest {collected[-1]}; " if collected else ""
            say(f"{latest}working ({duration(time.monotonic() - t0)})")
    reader.join(10)
    if proc.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
        print(f"  {args.label}: failed (exit {proc.returncode}) after {duration(time.monotonic() - t0)}",
              file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

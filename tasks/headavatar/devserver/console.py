"""What a person sees while the demo works: one line per phase and per stage, and never silence for long.

Everything also goes to a log file, where the servers, the image builds and Airflow write their own output.
While a phase or a stage works, a line comes at least every ``quiet_s`` seconds: its latest progress read
off that log (an image build's ``Step 7/19``, a training stage's ``step 300/500 ... about 2 min left``), else
how long it has been working.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from headavatar.devserver.heartbeat import duration

QUIET_S = 20.0


class LogTail:
    """The last line of a growing file that matches ``pattern``, as ``render(match)``: read incrementally."""

    def __init__(self, path: Path, pattern: str, render: Callable[[re.Match[str]], str] = lambda m: m.group(0)):
        self.path, self.pattern, self.render = path, re.compile(pattern), render
        self._offset = path.stat().st_size if path.exists() else 0
        self._latest: str | None = None

    def latest(self) -> str | None:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
            cut = chunk.rfind(b"\n") + 1  # whole lines only; a partial one is read next time
            self._offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                if m := self.pattern.search(line):
                    self._latest = self.render(m)
        return self._latest


class Console:
    """Lines for the terminal (kept even while this process's stdout and stderr go to the log) and the log."""

    def __init__(self, logfile: Path, quiet_s: float = QUIET_S):
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile, self.quiet_s = logfile, quiet_s
        self._log = open(logfile, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._tty = os.fdopen(os.dup(1), "w", buffering=1)  # the terminal as it was when the demo started
        self._lock = threading.Lock()
        self._open = False  # a phase's line waits for its duration
        self.last_said = time.monotonic()
        self.phases: dict[str, float] = {}

    def say(self, text: str = "", end: str = "\n") -> None:
        with self._lock:
            self._write(text + end)
            self._open = end == ""

    def note(self, text: str) -> None:
        """A line of its own, also in the middle of a phase's line."""
        with self._lock:
            self._write(("\n" if self._open else "") + text + "\n")
            self._open = False

    def _write(self, text: str) -> None:
        self._tty.write(text)
        self._tty.flush()
        self._log.write(text)
        self.last_said = time.monotonic()

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_said

    @contextlib.contextmanager
    def phase(self, name: str, what: str, progress: LogTail | None = None) -> Iterator[None]:
        """``what`` and, when done, how long it took; meanwhile :meth:`heartbeat` lines with ``progress``."""
        line = f"  {what:<58}"
        self.say(line, end="")
        t = time.monotonic()
        try:
            with self.heartbeat(progress):
                yield
        except BaseException:
            self.say("failed" if self._open else f"{line}failed")
            raise
        self.phases[name] = time.monotonic() - t
        took = f"{duration(self.phases[name]):>8}"
        with self._lock:
            self._write((took if self._open else line + took) + "\n")
            self._open = False

    @contextlib.contextmanager
    def heartbeat(self, progress: LogTail | None = None, indent: str = "    ") -> Iterator[None]:
        """While the block runs, a line whenever the console has been quiet for ``quiet_s`` seconds."""
        t0, stop = time.monotonic(), threading.Event()

        def beat() -> None:
            while not stop.wait(min(1.0, self.quiet_s)):
                if self.quiet_for() >= self.quiet_s:
                    latest = progress.latest() if progress is not None else None
                    self.note(f"{indent}... {latest or 'working'} ({duration(time.monotonic() - t0)})")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self._log.close()
        self._tty.close()

"""JOD (ColorVideoVDP's just-objectionable-difference, 10 = indistinguishable) of videos, from the project.

ColorVideoVDP (``cvvdp``, MIT) needs torchvision, and PyPI's torchvision cannot be imported beside the
project's CPU torch build, so it lives in an environment of its own (``make jod``: ``.venv-jod``, pinned
by ``images/requirements/jod.txt``). This module writes the frames to a scratch folder and runs
``jod_worker.py`` with that environment's Python: a subprocess with files in and one JSON line out.
Where the environment is missing, :func:`jod_python` says how to make it and JOD is left out, not guessed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from headavatar.errors import PipelineError

JOD_PYTHON_ENV = "HEADAVATAR_JOD_PYTHON"  # the JOD environment's interpreter, when not <repo>/.venv-jod
DISPLAY = "standard_4k"  # cvvdp's default: a 30-inch 4K sRGB monitor, 200 cd/m2, office light, 0.75 m away
PROTOCOL = f"ColorVideoVDP (cvvdp, display {DISPLAY}) per hold-out video, averaged"
WORKER = Path(__file__).with_name("jod_worker.py")
REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-jod" / "bin" / "python"


def jod_python() -> tuple[Path | None, str]:
    """(the JOD environment's Python, or None; why not, when None)."""
    named = os.environ.get(JOD_PYTHON_ENV)
    path = Path(named) if named else REPO_VENV
    if path.is_file() and os.access(path, os.X_OK):
        return path, ""
    where = f"${JOD_PYTHON_ENV}={named}" if named else str(REPO_VENV)
    return None, f"no JOD environment at {where}: make jod builds it (ColorVideoVDP, about 6 GB)"


class JodPairs:
    """Video pairs written to ``folder`` as they come (not held in memory), then scored in one worker run."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, test: np.ndarray, reference: np.ndarray) -> None:
        """One pair: uint8 RGB videos (frames, height, width, 3), the test one scored against the reference."""
        if test.shape != reference.shape or test.dtype != np.uint8 or reference.dtype != np.uint8 or test.ndim != 4:
            raise ValueError(f"JOD pair {self.count}: {test.shape} {test.dtype} against {reference.shape} "
                             f"{reference.dtype}: both must be uint8 (frames, height, width, 3)")
        for name, video in (("test", test), ("reference", reference)):  # raw bytes: nothing to unpickle
            np.ascontiguousarray(video).tofile(self.folder / f"{name}_{self.count}.u8")
        (self.folder / f"shape_{self.count}.json").write_text(json.dumps(list(test.shape)))
        self.count += 1

    def score(self, python: Path, fps: float) -> list[float]:
        """JOD of each pair, in the order they were added."""
        # -I: that environment's own packages only (not this one's PYTHONPATH, user site or the script's folder)
        r = subprocess.run([str(python), "-I", str(WORKER), "--display", DISPLAY, "--fps", str(fps), str(self.folder)],
                           stdout=subprocess.PIPE, text=True)
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines:
            raise PipelineError(f"JOD ({python} {WORKER.name}) failed with exit {r.returncode}: see its error above")
        return json.loads(lines[-1])["jod"]


def video_jod(pairs: list[tuple[np.ndarray, np.ndarray]], fps: float, python: Path) -> list[float]:
    """JOD of each (test, reference) video pair held in memory."""
    with tempfile.TemporaryDirectory(prefix="headavatar-jod-") as tmp:
        batch = JodPairs(Path(tmp))
        for test, reference in pairs:
            batch.add(test, reference)
        return batch.score(python, fps)

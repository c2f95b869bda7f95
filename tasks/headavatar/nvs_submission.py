"""The NeRSemble novel-view benchmark's submission: its constants, a zip writer and a check of a zip.

The facts are those of the official toolkit (``nersemble-benchmark`` 0.2.0, Apache-2.0: ``constants.py``
and ``NVSSubmissionDataWriter``/``NVSSubmissionDataReader``); tests/test_benchmark_export.py reads them from
the installed toolkit and fails when they drift. The toolkit itself is not a dependency: its reader imports
open3d, trimesh and a CUDA build of torch, and its frame counts come from metadata on the benchmark server.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headavatar.capture_id import validate_capture_id
from headavatar.errors import ConfigError
from headavatar.video import probe

HOLD_OUT_SERIALS = ("222200046", "222200037", "222200039")  # left, centre, right: the cameras to render
WIDTH, HEIGHT = 1100, 1604  # each submitted video: half the cameras' 2200x3208 frames (portrait)
FPS = 73  # the rig's frame rate
CRF = 14  # H.264 quality the toolkit encodes with
# The benchmark's participants and the one sequence of each that is scored.
SEQUENCES = {388: "GLASSES", 422: "EXP-2-eyes", 443: "FREE", 445: "EXP-6-tongue-1", 475: "HAIR"}
# How the toolkit's reader finds videos in a zip (get_file_overview).
NAME_PATTERN = re.compile(r"(\d+)/([\w\d\-_+]+)/cam_(\w+)\.mp4")


@dataclass(frozen=True)
class Request:
    """One capture and the sequence of it to render."""

    capture: str
    sequence: str

    @property
    def participant(self) -> int:
        return int(self.capture)

    @classmethod
    def parse(cls, text: str) -> Request:
        """``388`` (a benchmark participant: its scored sequence) or ``018:EXP-1-head``."""
        capture, _, sequence = text.partition(":")
        capture = validate_capture_id(capture)
        if not capture.isdigit():
            raise ConfigError(f"capture {capture!r}: the benchmark names participants by number, e.g. 388")
        if not sequence:
            if int(capture) not in SEQUENCES:
                raise ConfigError(f"capture {capture} is not a benchmark participant "
                                  f"({', '.join(map(str, SEQUENCES))}): name the sequence to render, "
                                  f"e.g. {capture}:EXP-1-head")
            sequence = SEQUENCES[int(capture)]
        return cls(capture, sequence)


def video_name(participant: int, sequence: str, serial: str) -> str:
    """A video's path inside the zip: ``{participant:03d}/{sequence}/cam_{serial}.mp4``."""
    return f"{participant:03d}/{sequence}/cam_{serial}.mp4"


def add_video(zf: zipfile.ZipFile, name: str, frames: Iterable[np.ndarray], scratch: Path) -> dict[str, int]:
    """RGB uint8 frames (HEIGHT, WIDTH, 3) encoded as the toolkit does (H.264 yuv420p, crf 14, 73 fps) into
    ``zf`` under ``name``. Returns the frame count, size and bytes."""
    from headavatar.avatar_video import write_mp4

    path = scratch / "video.mp4"
    info = write_mp4(frames, path, fps=FPS, crf=CRF)
    if (info["width"], info["height"]) != (WIDTH, HEIGHT):
        raise ValueError(f"{name}: frames are {info['width']}x{info['height']}, the benchmark takes {WIDTH}x{HEIGHT}")
    zf.write(path, name)  # stored, not deflated: the toolkit's own writer does the same
    path.unlink()
    return info


def check_submission(zip_path: Path, expected: dict[str, int]) -> dict[str, list]:
    """What is wrong with a submission zip, as the toolkit's reader reports it (``missing_files``,
    ``wrong_frame_counts``, ``wrong_resolutions``) plus ``unexpected_files`` (other names, or names its
    reader would not find). ``expected``: video name -> frame count. Empty when nothing is wrong."""
    issues: dict[str, list] = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        for name, count in expected.items():
            if name not in names:
                issues.setdefault("missing_files", []).append(name)
                continue
            frames, width, height = probe(io.BytesIO(zf.read(name)), name)
            if frames != count:
                issues.setdefault("wrong_frame_counts", []).append((name, frames, count))
            if (width, height) != (WIDTH, HEIGHT):
                issues.setdefault("wrong_resolutions", []).append((name, (width, height), (WIDTH, HEIGHT)))
    unexpected = [n for n in names if n not in expected or not NAME_PATTERN.match(n)]
    if unexpected:
        issues["unexpected_files"] = unexpected
    return issues

"""The benchmark submission's format against the official toolkit (nersemble-benchmark, installed without its
heavy dependencies: its constants are imported, its writer's and reader's source is read), and the pose
interpolation that fills the frames between fitted ones. The export itself: tests/test_export.py."""

from __future__ import annotations

import ast
import math
import warnings
import zipfile
from pathlib import Path

import nersemble_benchmark.constants as toolkit
import numpy as np
import pytest
import torch

from headavatar.errors import ConfigError
from headavatar.export_benchmark import Fitted, pose_at, slerp
from headavatar.nvs_submission import (
    CRF,
    FPS,
    HEIGHT,
    HOLD_OUT_SERIALS,
    NAME_PATTERN,
    SEQUENCES,
    WIDTH,
    Request,
    add_video,
    check_submission,
    video_name,
)


def _toolkit_class(name: str) -> ast.ClassDef:
    source = Path(toolkit.__file__).parent / "data" / "submission_data.py"
    with warnings.catch_warnings():  # its regex literal is not a raw string
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(source.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_submission_format_is_the_toolkits() -> None:
    assert list(HOLD_OUT_SERIALS) == toolkit.BENCHMARK_NVS_HOLD_OUT_SERIALS
    assert dict(toolkit.BENCHMARK_NVS_IDS_AND_SEQUENCES) == SEQUENCES
    # NVSSubmissionDataWriter.__init__: super().__init__(zip_path, fps, width, height)
    init = _method(_toolkit_class("NVSSubmissionDataWriter"), "__init__")
    call = next(n for n in ast.walk(init) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "__init__")
    assert [ast.literal_eval(a) for a in call.args[1:]] == [FPS, WIDTH, HEIGHT]
    # The reader expects (width, height) and finds videos with this pattern; the writer encodes at this crf.
    resolution = _method(_toolkit_class("NVSSubmissionDataReader"), "get_expected_resolution")
    assert ast.literal_eval(resolution.body[0].value) == (WIDTH, HEIGHT)
    overview = _method(_toolkit_class("VideoSubmissionDataReader"), "get_file_overview")
    pattern = next(n for n in ast.walk(overview)
                   if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "compile")
    assert ast.literal_eval(pattern.args[0]) == NAME_PATTERN.pattern
    writer = _method(_toolkit_class("VideoSubmissionDataWriter"), "add_video")
    crf = next(k for n in ast.walk(writer) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "crf")
    assert ast.literal_eval(crf.value) == CRF
    # Every name the export writes is one the toolkit's reader finds, with the parts it reads back.
    for participant, sequence in toolkit.BENCHMARK_NVS_IDS_AND_SEQUENCES:
        for serial in toolkit.BENCHMARK_NVS_HOLD_OUT_SERIALS:
            m = NAME_PATTERN.match(video_name(participant, sequence, serial))
            assert m and (int(m[1]), m[2], m[3]) == (participant, sequence, serial)


def test_the_check_reports_what_the_toolkits_reader_would(tmp_path: Path) -> None:
    zip_path = tmp_path / "s.zip"
    good, short, extra = (video_name(388, "GLASSES", s) for s in HOLD_OUT_SERIALS)
    frame = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    with zipfile.ZipFile(zip_path, "w") as zf:
        add_video(zf, good, [frame] * 3, tmp_path)
        add_video(zf, short, [frame] * 2, tmp_path)
        zf.writestr("388/GLASSES/notes.txt", "x")
    assert check_submission(zip_path, {good: 3, short: 3, extra: 3}) == {
        "missing_files": [extra], "wrong_frame_counts": [(short, 2, 3)], "unexpected_files": ["388/GLASSES/notes.txt"]}
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as zf, pytest.raises(ValueError, match="1100x1604"):
        add_video(zf, good, [frame[:800]], tmp_path)


def test_requests_name_a_participant_and_its_sequence() -> None:
    assert Request.parse("388") == Request("388", "GLASSES")
    assert Request.parse("018:EXP-1-head") == Request("018", "EXP-1-head")
    with pytest.raises(ConfigError, match="not a benchmark participant"):
        Request.parse("018")
    with pytest.raises(ConfigError, match="by number"):
        Request.parse("anna:FREE")


def test_frames_between_fitted_ones_are_interpolated() -> None:
    z = torch.zeros(3)
    quarter = torch.tensor([0.0, math.pi / 2, 0.0])
    torch.testing.assert_close(slerp(z, quarter, 0.5), quarter / 2)  # half the angle about the same axis
    a, b = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([-0.1, 0.4, 0.2])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    track = [Fitted(10, torch.tensor([1.0]), torch.cat([z, torch.tensor([0.0, 0.0, 1.0])])),
             Fitted(20, torch.tensor([3.0]), torch.cat([quarter, torch.tensor([2.0, 0.0, 1.0])]))]
    exp, pose = pose_at(track, 15)
    torch.testing.assert_close(exp, torch.tensor([2.0]))
    torch.testing.assert_close(pose, torch.cat([quarter / 2, torch.tensor([1.0, 0.0, 1.0])]))
    assert pose_at(track, 0)[0].item() == 1.0 and pose_at(track, 29)[0].item() == 3.0  # held at the ends
    assert pose_at(track, 20)[1] is track[1].pose

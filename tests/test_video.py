"""Decoding only what is needed gives the same pixels as decoding everything with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from headavatar.errors import RawCaptureError
from headavatar.layout import RAW
from headavatar.video import decode_frames, presentation_order


def _cv2_frames(path: str) -> list[np.ndarray]:
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            return frames
        frames.append(f)


@pytest.mark.parametrize("wanted", [{0, 7, 13, 19}, {0}, {2}, {5, 6, 7}, {12}, {19}, set(range(20))],
                         ids=["spread", "first", "b-frame", "adjacent", "middle", "last", "all"])
def test_skipping_decoder_matches_full_opencv_decode(tiny_capture: Path, wanted: set[int]) -> None:
    path = str(tiny_capture / RAW / "sequence_EXP-1-head_part-1/018/EXP-1-head/cam_222200043.mp4")
    reference = _cv2_frames(path)
    assert len(reference) == len(presentation_order(path, "v")) == 20
    stats: dict[str, int] = {}
    got = dict(decode_frames(path, wanted, "v", stats))
    assert sorted(got) == sorted(wanted)
    for k in wanted:
        assert np.array_equal(got[k], reference[k]), f"frame {k} differs"
    if wanted != set(range(20)):
        assert stats["decoded"] < 20  # unreferenced, unwanted frames were skipped
    if wanted == {0}:  # flushed right away, not fed the frames that follow until it lets frame 0 out
        assert stats["fed"] == stats["decoded"] == 1


def test_requesting_past_the_end_is_a_clear_error(tiny_capture: Path) -> None:
    path = str(tiny_capture / RAW / "sequence_EXP-1-head_part-1/018/EXP-1-head/cam_222200043.mp4")
    with pytest.raises(RawCaptureError, match="has 20 frames, frame 25 was requested"):
        list(decode_frames(path, {0, 25}, "cam.mp4"))

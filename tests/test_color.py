"""The v2 colour correction against colour-science (the dataset authors' implementation) and its own float64 form."""

from __future__ import annotations

import colour
import numpy as np
import pytest
from colour.characterisation import matrix_augmented_Cheung2004

from headavatar.color import TERMS, ColorCorrection, check_matrix, parse_color_calibration, reference_correct
from headavatar.errors import RawCaptureError
from headavatar.imaging import CropResize


def colour_science(rgb: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 RGB exactly as the dataset's own code does it, with colour-science."""
    linear = colour.cctf_decoding(rgb / 255.0).reshape(-1, 3)
    out = (ccm @ matrix_augmented_Cheung2004(linear, ccm.shape[1]).T).T.reshape(rgb.shape)
    return np.clip(colour.cctf_encoding(out) * 255, 0, 255).astype(np.uint8)


def random_matrix(terms: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((3, terms))
    m[:, :3] = np.diag(rng.uniform(0.8, 1.3, 3)) + rng.normal(0, 0.05, (3, 3))
    m[:, 3:] = rng.normal(0, 0.08, (3, terms - 3))
    return m


@pytest.mark.parametrize("terms", sorted(TERMS))
def test_matches_colour_science_for_every_term_count(terms: int) -> None:
    rng = np.random.default_rng(terms)
    bgr = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    bgr[0, :64] = np.arange(0, 256, 4)[:, None]  # greys, with black and near-white
    m = random_matrix(terms, rng)
    expected = colour_science(np.ascontiguousarray(bgr[..., ::-1]), m)[..., ::-1]
    ours = ColorCorrection(m)(bgr)
    diff = np.abs(ours.astype(int) - expected)
    # The 16-bit encode table moves a value by one level only next to a level boundary (measured: 0.09-0.16%).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())
    # The float64 spelling-out in headavatar.color is the same procedure as colour-science's.
    assert np.array_equal(reference_correct(np.ascontiguousarray(bgr[..., ::-1]), m),
                          np.ascontiguousarray(expected[..., ::-1]))


def test_identity_changes_nothing_and_correction_changes_colours() -> None:
    bgr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.abs(ColorCorrection(np.eye(3))(bgr).astype(int) - bgr).max() <= 1
    gains = ColorCorrection(np.diag([1.2, 1.0, 0.8]))(bgr).astype(int) - bgr  # R up, B down (BGR order)
    assert gains[..., 2].mean() > 5 and gains[..., 0].mean() < -5 and abs(gains[..., 1].mean()) < 0.5


def test_correcting_inside_the_crop_equals_correcting_the_whole_frame_first() -> None:
    """Stage 1 corrects only the kept source pixels; with a constant term black padding must stay black."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (150, 120, 3), dtype=np.uint8)
    cc = ColorCorrection(random_matrix(10, rng))  # has a constant term: correct(black) != black
    assert cc(np.zeros((1, 1, 3), np.uint8)).any()
    for left, top, size in [(-20, 10, 140), (10, 20, 50), (-30, -40, 200)]:
        crop = CropResize(left, top, size, 96, 32)
        full_first = CropResize(left, top, size, 96, 32).apply(cc(frame))
        assert np.array_equal(crop.apply(frame, cc), full_first)


def test_calibration_files_are_checked() -> None:
    ok = parse_color_calibration(b'{"1": [[1,0,0],[0,1,0],[0,0,1]], "2": [[1,0,0,0],[0,1,0,0],[0,0,1,0.1]]}', "f")
    assert ok["2"].shape == (3, 4)
    with pytest.raises(RawCaptureError, match=r"^f: \[1\] must be 3xT with T in .* got shape \[3, 6\]"):
        parse_color_calibration(b'{"1": [[1,0,0,0,0,0],[0,1,0,0,0,0],[0,0,1,0,0,0]]}', "f")
    with pytest.raises(RawCaptureError, match=r"^f: \[1\] contains non-finite"):
        parse_color_calibration(b'{"1": [[1,0,NaN],[0,1,0],[0,0,1]]}', "f")
    with pytest.raises(RawCaptureError, match=r"^f: not valid JSON"):
        parse_color_calibration(b"[1,", "f")
    with pytest.raises(RawCaptureError, match=r"must be a 3xT matrix of numbers"):
        check_matrix([["a", 1, 2]], "m")

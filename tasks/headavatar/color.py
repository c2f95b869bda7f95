"""NeRSemble v2 colour correction: sRGB -> linear -> Cheung et al. (2004) polynomial CCM -> sRGB.

The dataset authors' procedure per pixel (RGB in [0, 1]): decode sRGB to linear, expand into the
polynomial terms of Cheung et al. 2004 (as many as the matrix has columns), multiply by the 3 x T
matrix, encode back to sRGB, scale by 255, clip and truncate to uint8. It is applied here to uint8
BGR frames with lookup tables instead of per-pixel transcendental functions:

* decode: a 256-entry table, :func:`cv2.LUT`;
* the matrix: :func:`cv2.transform`. Terms 3 and 4 (linear, affine) run on 16-bit linear values
  (x 65535), where OpenCV's saturating, rounding arithmetic is the clip and the quantisation in
  one pass; higher terms are products of float32 channel planes, transformed in groups of four;
* encode: the 16-bit linear values index a 65,536-entry table of the truncated 8-bit result.
  Next to an exact float64 evaluation this moves a value by at most one level, and only next to a
  level boundary: about 0.1-0.2% of values (tests/test_color.py bounds it at 0.5%).
  The 3x3 case costs about 60 ms of CPU for a 2200x2600 region (three times less than all-float32).

It is per pixel, so correcting only the source pixels a crop keeps gives the same result as
correcting the whole frame first (stage 1 does that: :meth:`headavatar.imaging.CropResize.crop`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import cv2
import numpy as np

from headavatar.errors import RawCaptureError

# Exponents (r, g, b) of each term of the Cheung et al. 2004 expansion, by term count (the order
# is the paper's, as implemented by colour-science's matrix_augmented_Cheung2004).
_LINEAR = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
_CROSS = [(1, 1, 0), (1, 0, 1), (0, 1, 1)]
_SQUARES = [(2, 0, 0), (0, 2, 0), (0, 0, 2)]
_CUBES = [(3, 0, 0), (0, 3, 0), (0, 0, 3)]
_RGB = (1, 1, 1)
_ONE = (0, 0, 0)
_DEG3 = [(2, 1, 0), (0, 2, 1), (1, 0, 2)]
_DEG3_MORE = [(2, 0, 1), (1, 2, 0), (0, 1, 2)]
TERMS: dict[int, list[tuple[int, int, int]]] = {
    3: _LINEAR,
    4: [*_LINEAR, _ONE],
    5: [*_LINEAR, _RGB, _ONE],
    7: [*_LINEAR, *_CROSS, _ONE],
    8: [*_LINEAR, *_CROSS, _RGB, _ONE],
    10: [*_LINEAR, *_CROSS, *_SQUARES, _ONE],
    11: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, _ONE],
    14: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_CUBES, _ONE],
    16: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_CUBES],
    17: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_CUBES, _ONE],
    19: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_DEG3_MORE, *_CUBES],
    20: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_DEG3_MORE, *_CUBES, _ONE],
    22: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_DEG3_MORE, *_CUBES, (2, 1, 1), (1, 2, 1), (1, 1, 2)],
    35: [*_LINEAR, *_CROSS, *_SQUARES, _RGB, *_DEG3, *_DEG3_MORE, *_CUBES,
         (3, 1, 0), (3, 0, 1), (1, 3, 0), (0, 3, 1), (1, 0, 3), (0, 1, 3),  # R^3 G, R^3 B, G^3 R, G^3 B, B^3 R, B^3 G
         (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 0), (2, 0, 2), (0, 2, 2), (4, 0, 0), (0, 4, 0), (0, 0, 4), _ONE],
}
ENCODE_BITS = 16


def srgb_decode(v: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB EOTF (the piecewise curve), float64."""
    v = np.asarray(v, np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`srgb_decode`; negative values stay on the linear segment (then clipped)."""
    v = np.asarray(v, np.float64)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.abs(v) ** (1 / 2.4) - 0.055)


_DECODE_LUT = srgb_decode(np.arange(256) / 255.0).astype(np.float32)
_DECODE_LUT16 = np.round(srgb_decode(np.arange(256) / 255.0) * (2**ENCODE_BITS - 1)).astype(np.uint16)
# 1e-9: the encode of exactly 1.0 is 0.99999... in floating point; saturated values must give 255.
_ENCODE_LUT = np.floor(np.clip(srgb_encode(np.arange(2**ENCODE_BITS) / (2**ENCODE_BITS - 1)), 0, 1) * 255 + 1e-9
                       ).astype(np.uint8)


def check_matrix(value: object, where: str) -> np.ndarray:
    """A 3 x T matrix with T one of the Cheung 2004 term counts, or a one-line error naming ``where``."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RawCaptureError(f"{where} must be a 3xT matrix of numbers") from None
    if m.ndim != 2 or m.shape[0] != 3 or m.shape[1] not in TERMS:
        raise RawCaptureError(f"{where} must be 3xT with T in {sorted(TERMS)} (Cheung 2004 terms), "
                              f"got shape {list(m.shape)}")
    if not np.isfinite(m).all():
        raise RawCaptureError(f"{where} contains non-finite values")
    return m


def parse_color_calibration(data: bytes, where: str) -> dict[str, np.ndarray]:
    """``color_calibration.json``: camera serial -> 3 x T colour-correction matrix."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RawCaptureError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not doc:
        raise RawCaptureError(f"{where}: expected an object mapping camera serials to 3xT matrices")
    return {str(cam): check_matrix(m, f"{where}: [{cam}]") for cam, m in doc.items()}


@dataclass(frozen=True)
class ColorCorrection:
    """One camera's correction, applied to uint8 BGR images (pickles small: tables are module-level)."""

    matrix: np.ndarray  # (3, T), RGB in, RGB out
    _groups: list = field(init=False, repr=False, compare=False)
    _fast: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = check_matrix(self.matrix, "colour-correction matrix")
        object.__setattr__(self, "matrix", m)
        # Rows and the linear columns reordered for BGR images; the constant term becomes the
        # affine column of the first cv2.transform; the other terms are transformed in groups.
        terms = TERMS[m.shape[1]]
        out_bgr = m[::-1]
        cols = {t: out_bgr[:, i] for i, t in enumerate(terms)}
        first = np.stack([cols[(0, 0, 1)], cols[(0, 1, 0)], cols[(1, 0, 0)]], 1)
        if _ONE in cols:
            first = np.concatenate([first, cols[_ONE][:, None]], 1)
        rest = [t for t in terms if sum(t) > 1]
        groups = [(None, first.astype(np.float32))]
        fast = None
        if len(terms) <= 4:  # linear or affine: one transform in 16-bit (the constant in 16-bit units too)
            fast = first.copy()
            fast[:, 3:] *= 2**ENCODE_BITS - 1
            fast = fast.astype(np.float32)
        object.__setattr__(self, "_fast", fast)
        for s in range(0, len(rest), 4):
            chunk = rest[s : s + 4]
            groups.append((chunk, np.stack([cols[t] for t in chunk], 1).astype(np.float32)))
        object.__setattr__(self, "_groups", groups)

    @property
    def terms(self) -> int:
        return self.matrix.shape[1]

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """Corrected copy of a uint8 BGR image (H, W, 3)."""
        if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError("colour correction needs a uint8 BGR image")
        if self._fast is not None:
            return np.take(_ENCODE_LUT, cv2.transform(cv2.LUT(bgr, _DECODE_LUT16), self._fast), mode="clip")
        lin = cv2.LUT(bgr, _DECODE_LUT)  # float32, still BGR
        (_, first), *rest = self._groups
        out = cv2.transform(lin, first)
        if rest:
            b, g, r = cv2.split(lin)
            plane = {(1, 0, 0): r, (0, 1, 0): g, (0, 0, 1): b}
            for chunk, m in rest:
                planes = [_monomial(t, plane) for t in chunk]
                if len(planes) == 2:  # cv2.transform takes 1, 3 or 4 channels (or matches m.cols)
                    planes.append(np.zeros_like(r))
                    m = np.concatenate([m, np.zeros((3, 1), np.float32)], 1)
                out += cv2.transform(cv2.merge(planes), m)
        return encode_linear(out)


def _monomial(t: tuple[int, int, int], plane: dict[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    acc = None
    for base, power in zip(((1, 0, 0), (0, 1, 0), (0, 0, 1)), t, strict=True):
        for _ in range(power):
            acc = plane[base].copy() if acc is None else cv2.multiply(acc, plane[base])
    return acc


def encode_linear(lin: np.ndarray) -> np.ndarray:
    """float32 linear (any shape) -> uint8 sRGB via the 16-bit table (overwrites ``lin``)."""
    np.clip(lin, 0, 1, out=lin)
    lin *= 2**ENCODE_BITS - 1
    lin += 0.5
    return np.take(_ENCODE_LUT, lin.astype(np.uint16), mode="clip")


def reference_correct(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The procedure spelled out in float64 (slow; for tests and documentation): uint8 RGB in and out."""
    lin = srgb_decode(rgb.reshape(-1, 3) / 255.0)
    terms = TERMS[matrix.shape[1]]
    expanded = np.stack([lin[:, 0] ** a * lin[:, 1] ** b * lin[:, 2] ** c for a, b, c in terms], 1)
    out = srgb_encode(expanded @ np.asarray(matrix, np.float64).T)
    return (np.clip(out * 255, 0, 255)).astype(np.uint8).reshape(rgb.shape)

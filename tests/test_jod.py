"""JOD through the JOD environment (``make jod``): ColorVideoVDP itself, run as the export benchmark runs it."""

from __future__ import annotations

import numpy as np
import pytest

from headavatar.jod import JOD_PYTHON_ENV, jod_python, video_jod


def _videos() -> dict[str, np.ndarray]:
    """A moving textured pattern (8 frames, 96x128) and the same degraded three ways."""
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    frames = [128 + 60 * np.sin((x + 3 * t) / 7.0)[..., None] * np.cos(y / 11.0)[..., None] * np.array([1, 0.8, 0.6])
              for t in range(8)]
    reference = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).normal(size=reference.shape)
    return {"reference": reference,
            "slight": np.clip(reference + 2 * noise, 0, 255).astype(np.uint8),
            "strong": np.clip(reference + 25 * noise, 0, 255).astype(np.uint8),
            "black": np.zeros_like(reference)}


def test_jod_is_10_for_the_reference_and_falls_with_the_damage() -> None:
    python, why = jod_python()
    assert python is not None, why  # make test builds it (make jod)
    v = _videos()
    pairs = [(v[k], v["reference"]) for k in ("reference", "slight", "strong", "black")]
    same, slight, strong, black = video_jod(pairs, fps=73, python=python)
    assert same == pytest.approx(10.0, abs=1e-3)
    assert 10.0 > slight > strong > black, (slight, strong, black)
    assert slight > 9 and black < 5, (slight, black)


def test_without_the_environment_jod_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(JOD_PYTHON_ENV, str(tmp_path / "missing" / "python"))
    python, why = jod_python()
    assert python is None and "make jod" in why and str(tmp_path / "missing") in why
    v = _videos()
    with pytest.raises(ValueError, match="JOD pair 0"):
        video_jod([(v["reference"][:4], v["reference"])], fps=73, python=tmp_path)

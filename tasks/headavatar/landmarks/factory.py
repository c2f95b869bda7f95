"""Picks a landmark detector implementation from the config (imported lazily: each needs its own packages)."""

from __future__ import annotations

from pathlib import Path

from headavatar.errors import ConfigError
from headavatar.landmarks.base import LandmarkDetector
from headavatar.settings import LandmarksConfig


def build_detector(cfg: LandmarksConfig, dlib_model: Path | None = None) -> LandmarkDetector:
    """``dlib_model``: the local copy of ``cfg.dlib_model`` (the stage fetches it from the bucket)."""
    if cfg.detector == "dlib":
        from headavatar.landmarks.dlib68 import DlibDetector

        if dlib_model is None:
            raise ConfigError("landmarks.detector=dlib needs its model file (landmarks.dlib_model)")
        return DlibDetector(dlib_model, threshold=cfg.dlib_threshold, shown=cfg.dlib_model)
    if cfg.detector == "face_alignment":
        from headavatar.landmarks.fan import FanDetector

        return FanDetector(cfg)
    raise ConfigError(f"landmarks.detector={cfg.detector!r} does not detect in images")

"""Picks a landmark detector implementation from the config (imported lazily: each needs its own packages)."""

from __future__ import annotations

from headavatar.errors import ConfigError
from headavatar.landmarks.base import LandmarkDetector
from headavatar.settings import LandmarksConfig


def build_detector(cfg: LandmarksConfig) -> LandmarkDetector:
    if cfg.detector == "dlib":
        from headavatar.landmarks.dlib68 import DlibDetector

        return DlibDetector(threshold=cfg.dlib_threshold)
    if cfg.detector == "face_alignment":
        from headavatar.landmarks.fan import FanDetector

        return FanDetector(cfg)
    raise ConfigError(f"landmarks.detector={cfg.detector!r} does not detect in images")

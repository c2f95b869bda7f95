"""The detector interface and the factory that picks an implementation from the config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from headavatar.errors import ConfigError
from headavatar.settings import LandmarksConfig

N_LANDMARKS = 68


@dataclass(frozen=True)
class Landmarks:
    points: np.ndarray  # (68, 2) pixels (x, y) of the image given to the detector
    confidence: np.ndarray  # (68,) in [0, 1]
    score: float  # the face detector's score for the chosen face

    def as_array(self) -> np.ndarray:
        """(68, 3) x, y, confidence: the reference's ``lmk_<cam>.npy`` layout."""
        return np.concatenate([self.points, self.confidence[:, None]], 1).astype(np.float32)


class LandmarkDetector(ABC):
    """Finds the most confident face in an RGB image; ``None`` when there is no face."""

    name: str

    @abstractmethod
    def detect(self, rgb: np.ndarray) -> Landmarks | None: ...


def build_detector(cfg: LandmarksConfig) -> LandmarkDetector:
    if cfg.detector == "dlib":
        from headavatar.landmarks.dlib68 import DlibDetector

        return DlibDetector()
    if cfg.detector == "face_alignment":
        from headavatar.landmarks.fan import FanDetector

        return FanDetector(cfg)
    raise ConfigError(f"landmarks.detector={cfg.detector!r} does not detect in images")

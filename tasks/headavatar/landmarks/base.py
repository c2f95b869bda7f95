"""The detector interface: what every landmark detector returns and must implement.

Kept apart from the factory (:mod:`headavatar.landmarks.factory`) so the implementations can
import it without an import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

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

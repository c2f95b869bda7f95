"""The interface every matting method implements, so stage 3 batches and pipelines them alike."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Matter(ABC):
    """Turns a batch of (image, background plate) pairs, BGR uint8, into alpha mattes in [0, 1].

    ``batch_size`` is how many pairs one call should get for the method to run at full speed.
    """

    batch_size: int = 1

    @abstractmethod
    def __call__(self, images: list[np.ndarray], plates: list[np.ndarray]) -> list[np.ndarray]: ...

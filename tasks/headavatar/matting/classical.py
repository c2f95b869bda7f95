"""Weights-free matting: background difference, cleaned up, refined with a guided filter.

Works because every NeRSemble camera is static and photographed its empty background plate: the
subject is where the frame differs from the plate (with hysteresis, so faint differences count
where they join clear ones). The hard mask is cleaned (speckles removed,
holes filled, the head kept as the largest component) and then softened along image edges by a
guided filter (He et al., 2010), which gives a matte whose edges follow the subject's.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from headavatar.matting.base import Matter
from headavatar.settings import MattingConfig


@dataclass(frozen=True)
class BackgroundDifference:
    """One image's matte from its difference to the plate; the parameters are ``matting.classical_*``."""

    threshold: float = 0.0  # difference threshold in 8-bit levels; 0 = Otsu, clamped to [10, 40]
    low_threshold: float = 4.0  # hysteresis floor in 8-bit levels (above sensor/codec noise)
    blur_sigma: float = 1.5
    guided_radius: int = 8  # at 2048 px; scaled with the image
    guided_eps: float = 1e-3
    min_component: float = 0.05  # keep components at least this fraction of the largest

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        """BGR uint8 image and plate (same size) -> alpha in [0, 1], float32."""
        h, w = image.shape[:2]
        scale = max(h, w) / 2048
        sigma = max(self.blur_sigma * scale, 0.5)
        a = cv2.GaussianBlur(image, (0, 0), sigma).astype(np.int16)
        b = cv2.GaussianBlur(background, (0, 0), sigma).astype(np.int16)
        diff = np.abs(a - b).max(axis=2).astype(np.uint8)
        t = self.threshold
        if t <= 0:
            t, _ = cv2.threshold(diff, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            t = float(np.clip(t, 10, 40))
        # Hysteresis: faint differences count where they connect to clear ones, so skin in front
        # of a similar-coloured backdrop stays attached to the head instead of becoming a bite.
        strong = (diff > t).astype(np.uint8)
        weak = (diff > max(self.low_threshold, 0.35 * t)).astype(np.uint8)
        n, labels = cv2.connectedComponents(weak, connectivity=8)
        touched = np.zeros(n, bool)
        touched[np.unique(labels[strong > 0])] = True
        touched[0] = False
        mask = touched[labels].astype(np.uint8)
        k = max(3, round(5 * scale) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
        mask = _keep_large_components(mask, self.min_component)
        mask = _fill_holes(mask)
        guide = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
        radius = max(1, round(self.guided_radius * scale))
        alpha = guided_filter(guide, mask.astype(np.float32), radius, self.guided_eps)
        return np.clip(alpha, 0.0, 1.0)



class ClassicalMatter(Matter):
    """One image per core at a time: OpenCV releases the GIL, so threads suffice."""

    def __init__(self, cfg: MattingConfig):
        self.fn = BackgroundDifference(cfg.classical_threshold, cfg.classical_low_threshold,
                                       guided_radius=cfg.guided_radius, guided_eps=cfg.guided_eps)
        self.batch_size = len(os.sched_getaffinity(0))
        self.pool = ThreadPoolExecutor(self.batch_size, thread_name_prefix="matting")

    def __call__(self, images: list[np.ndarray], plates: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.pool.map(self.fn, images, plates))


def _keep_large_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, np.uint8)
    keep[1:] = areas >= min_fraction * areas.max()
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border."""
    h, w = mask.shape
    flood = np.zeros((h + 2, w + 2), np.uint8)
    flood[1:-1, 1:-1] = mask
    cv2.floodFill(flood, None, (0, 0), 2)
    return (flood[1:-1, 1:-1] != 2).astype(np.uint8)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Edge-preserving smoothing of ``src`` steered by the grey image ``guide`` (box filters)."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    cov_ip = box(guide * src) - mean_i * mean_p
    var_i = box(guide * guide) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)

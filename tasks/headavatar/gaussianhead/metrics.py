"""The avatar's image metrics under one named protocol, computed with torchmetrics.

Published head-avatar results report PSNR / SSIM / LPIPS from standard implementations; hand-written
ones differ in windows, padding and data range, so numbers could not be set beside them. Here:

* PSNR: ``torchmetrics.functional.peak_signal_noise_ratio`` (data range 1), per image, averaged.
* SSIM: ``torchmetrics.functional.structural_similarity_index_measure`` (Gaussian window 11, sigma
  1.5, k1 0.01, k2 0.03, data range 1, reflection padding), per image, averaged.
* LPIPS-VGG when weights are supplied (``gaussianhead.lpips_weights``), else not reported.
* Images are the super-resolved render, clamped to [0, 1], against the ground truth times its matte
  (black background, as the avatar renders), both times the camera's visibility mask.
  ``full``: the whole image. ``matte``: only pixels inside the matte (matte > 0.5): PSNR from their
  mean squared error, SSIM as the mean of the SSIM map over them (the map is computed on the full image).
* Evaluation sets are named (``novel_view``: the training frames from held-out cameras;
  ``self_reenactment``: a held-out sequence, driven by its own fitted expressions and poses, without
  per-frame pose corrections).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

if TYPE_CHECKING:
    from headavatar.training.device_data import DeviceViews

PROTOCOL = "headavatar-eval/1"
PROTOCOL_TEXT = ("torchmetrics PSNR (data_range=1) and SSIM (gaussian 11x11, sigma 1.5, k1 0.01, k2 0.03, "
                 "reflect padding); render clamped to [0,1] vs GT x matte (black background), both x visibility; "
                 "full = whole image, matte = pixels with matte > 0.5 (PSNR of their MSE, mean of the SSIM map); "
                 "LPIPS-VGG (LPIPS v0.1 heads) only when weights are supplied; per image, averaged over the set")


@dataclass
class EvalSet:
    """A named list of (frame, camera) pairs of one capture's views at both resolutions; ``known_frames``: the
    frames were trained on (per-frame pose corrections apply)."""

    name: str
    coarse: DeviceViews
    fine: DeviceViews
    pairs: list[tuple[int, int]]
    known_frames: bool
    description: str


def image_scores(pred: torch.Tensor, gt: torch.Tensor, matte: torch.Tensor,
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Scores of one image pair (3, H, W) in [0, 1] (already masked as the protocol says) and its matte (H, W)."""
    with torch.autocast(pred.device.type, enabled=False):
        a, b = pred.float()[None], gt.float()[None]
        inside = (matte > 0.5).float()[None, None]
        ssim, ssim_map = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
        out = {"psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)), "ssim": float(ssim)}
        n = inside.sum()
        if n > 0:
            mse = (((a - b) ** 2) * inside).sum() / (3 * n)
            out["psnr_matte"] = float(-10 * torch.log10(mse.clamp_min(1e-10)))
            out["ssim_matte"] = float((ssim_map * inside).sum() / (3 * n))
        if lpips is not None:
            out["lpips"] = float(lpips(a, b)[0])
    return out


def average(rows: Iterable[dict[str, float]], prefix: str) -> dict[str, float]:
    """Mean of each score over the rows, keys ``<prefix>_<score>``."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            sums.setdefault(k, []).append(v)
    return {f"{prefix}_{k}": sum(v) / len(v) for k, v in sums.items()}

"""The frames a trained avatar can be posed at, and its Gaussians at one of them (for the exports)."""

from __future__ import annotations

import torch

from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.render.gaussian_raster import Splats
from headavatar.training.device_data import DeviceViews


def avatar_frames(trainer: GaussianHeadTrainer) -> dict[str, tuple[DeviceViews, int, bool]]:
    """Every frame the avatar can be posed at, by frame folder: (its views, its index there, whether it was
    trained on, so its learned pose correction applies). Held-out sequences are driven by their own fits."""
    frames = {f: (trainer.coarse, i, True) for i, f in enumerate(trainer.coarse.folders)}
    for s in trainer.eval_sets:
        if not s.known_frames:
            frames.update({f: (s.coarse, i, False) for i, f in enumerate(s.coarse.folders) if f not in frames})
    return frames


@torch.no_grad()
def posed_splats(trainer: GaussianHeadTrainer, views: DeviceViews, index: int, known: bool) -> Splats:
    """The avatar's Gaussians for one frame: world positions, rotations, scales, opacities, 32 channels."""
    s = trainer.head.splats(views.exp[index], views.pose[index], views.scale, index if known else None)
    return Splats(*(t.float() for t in (s.means, s.quats, s.scales, s.opacities, s.colors)))

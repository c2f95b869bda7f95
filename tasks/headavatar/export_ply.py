"""``headavatar export ply``: a trained avatar's Gaussians at one frame, or at every frame of a sequence, as
the 3DGS ``.ply`` that splat viewers open (:mod:`headavatar.splat_ply`).

What a plain splat viewer shows is the avatar's coarse RGB: the first three of its 32 feature channels, as
stage 6 rasterises them before the super-resolution network. The other 29 channels and that network, which
turn the coarse render into the sharp 2048-pixel image, have no place in the format (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from headavatar.errors import ConfigError
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.render.gaussian_raster import Splats
from headavatar.render_avatar import load_avatar
from headavatar.settings import PipelineConfig
from headavatar.splat_ply import to_ply_bytes
from headavatar.storage import ObjectStore
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


def export_ply(store: ObjectStore, capture: str, config: PipelineConfig, out: Path, frame: str | None = None,
               sequence: str | None = None) -> dict[str, Any]:
    """``out`` (a file) for one frame (default: the first trained frame), or ``out/<frame>.ply`` for each
    frame of ``sequence``. Returns what was written."""
    trainer = load_avatar(store, capture, config)
    frames = avatar_frames(trainer)
    if sequence is not None:
        seqs = {f: v.views.sequences[i] if v.views.sequences else "" for f, (v, i, _) in frames.items()}
        chosen = sorted(f for f, s in seqs.items() if s == sequence)
        if not chosen:
            raise ConfigError(f"{capture}: no frame of sequence {sequence!r} in the avatar (its sequences: "
                              f"{', '.join(sorted(set(seqs.values())))})")
        out.mkdir(parents=True, exist_ok=True)
        paths = {f: out / f"{f}.ply" for f in chosen}
    else:
        name = frame if frame is not None else trainer.coarse.folders[0]
        if name not in frames:
            raise ConfigError(f"{capture}: no frame {name!r} in the avatar (frames: {', '.join(sorted(frames))})")
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = {name: out}
    sizes = {}
    for f, path in paths.items():
        data = to_ply_bytes(posed_splats(trainer, *frames[f]))
        tmp = path.with_suffix(".ply.part")
        tmp.write_bytes(data)
        tmp.replace(path)  # a file that is there is whole
        sizes[f] = len(data)
    return {"capture": capture, "frames": {f: str(p) for f, p in paths.items()}, "gaussians": len(trainer.head.xyz),
            "bytes": sizes, "layout": "3dgs-ply (f_dc from the coarse RGB; no f_rest)"}

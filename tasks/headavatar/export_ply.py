"""``headavatar export ply``: a trained avatar's Gaussians at one frame, or at every frame of a sequence, as
the 3DGS ``.ply`` that splat viewers open (:mod:`headavatar.splat_ply`).

What a plain splat viewer shows is the avatar's coarse RGB: the first three of its 32 feature channels, as
stage 6 rasterises them before the super-resolution network. The other 29 channels and that network, which
turn the coarse render into the sharp 2048-pixel image, have no place in the format (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headavatar.errors import ConfigError
from headavatar.posing import avatar_frames, posed_splats
from headavatar.render_avatar import load_avatar
from headavatar.settings import PipelineConfig
from headavatar.splat_ply import to_ply_bytes
from headavatar.storage import ObjectStore


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

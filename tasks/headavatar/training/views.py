"""Multiview training data of one capture, loaded once from stages 2-4 into memory (uint8).

Both training stages read the same things: per frame and camera the image, the matte and the
visibility mask at one resolution, the camera, and per frame the stage-4 fit and its sequence
(for the held-out-sequence split, :func:`split_frames`).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from headavatar.errors import ConfigError, UpstreamMissing
from headavatar.imaging import decode_image, npy_array, npz_arrays
from headavatar.layout import FRAMES_INDEX
from headavatar.settings import sequence_name

if TYPE_CHECKING:  # runtime import would pull in boto3, which GPU benchmark hosts may lack
    from headavatar.contract.stage import StageContext

log = logging.getLogger(__name__)


@dataclass
class Views:
    folders: list[str]  # fitted frames, in order
    cameras: list[str]
    images: np.ndarray  # (F, C, S, S, 3) uint8 RGB
    masks: np.ndarray  # (F, C, S, S) uint8 (the matte)
    visible: np.ndarray  # (F, C, S, S) uint8 (255 where the source had pixels)
    intrinsics: np.ndarray  # (F, C, 3, 3) at this resolution
    extrinsics: np.ndarray  # (F, C, 3, 4) world-to-camera
    pose: np.ndarray  # (F, 6) axis-angle + translation
    scale: float
    exp: np.ndarray  # (F, K)
    landmarks_3d: np.ndarray  # (F, 68, 3) world
    sequences: list[str] = field(default_factory=list)  # per frame: its sequence name (empty: unknown)

    @property
    def size(self) -> int:
        return self.images.shape[2]

    def camera_index(self, names: tuple[str, ...] | list[str]) -> list[int]:
        return [self.cameras.index(c) for c in names if c in self.cameras]

    def tensors(self, frames: torch.Tensor, cams: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch of (frame, camera) pairs as float tensors on ``device``."""
        f, c = frames.numpy(), cams.numpy()

        def t(a: np.ndarray, scale: float = 1.0) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.float32) * scale

        return {"image": t(self.images[f, c], 1 / 255), "mask": t(self.masks[f, c], 1 / 255),
                "visible": t(self.visible[f, c], 1 / 255), "K": t(self.intrinsics[f, c]),
                "E": t(self.extrinsics[f, c]), "pose": t(self.pose[f]), "exp": t(self.exp[f]),
                "landmarks_3d": t(self.landmarks_3d[f])}


def load_views(ctx: StageContext, size: int, lowres: bool, holdout: tuple[str, ...] = (),
               setting: str = "") -> tuple[Views, Views | None]:
    """(frames to train on, frames of the held-out sequences matching ``holdout`` or None): every fitted
    frame x camera at ``size`` pixels (from the low-res or full-size images), split before any pixel is read.

    Each set's pixels are decoded straight into arrays made once for the set, so the host holds them
    once: a capture's views at 2048² are ~21 MB each, ~34 GB for 100 frames x 16 cameras, where
    stacking per-view arrays, then copying the split, held two to three times that."""
    index = json.loads(ctx.store.get_bytes(ctx.input_key("sample", FRAMES_INDEX)))
    fitted = {f.split("/")[1] for f in ctx.upstream["fitting"].files if f.startswith("params/")}
    folders = [f["folder"] for f in index["frames"] if f["folder"] in fitted]
    if not folders:
        raise UpstreamMissing(f"stage 'fitting' fitted no frame of {ctx.capture}")
    sequence_of = {f["folder"]: sequence_name(f.get("sequence", "")) for f in index["frames"]}
    sequences = [sequence_of[f] for f in folders]
    train, held = split_frames(sequences, holdout, setting)
    pick = _ViewLoader(ctx, size, lowres)
    return (pick([folders[i] for i in train], [sequences[i] for i in train]),
            pick([folders[i] for i in held], [sequences[i] for i in held]) if held else None)


class _ViewLoader:
    """Reads the given frames' views of one capture at one size into arrays made once for them."""

    def __init__(self, ctx: StageContext, size: int, lowres: bool):
        self.ctx, self.size, self.suffix = ctx, size, "_lowres" if lowres else ""
        self.cams = list(ctx.config.capture.cameras)
        self.out_size = ctx.config.extract.output_size

    def image(self, stage: str, rel: str, gray: bool) -> np.ndarray:
        img = decode_image(self.ctx.store.get_bytes(self.ctx.input_key(stage, rel)), rel)
        if img.shape[0] != self.size:
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return img[..., 0] if gray else img[..., ::-1]

    def fit(self, folder: str) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        store = self.ctx.store
        params = self.ctx.input_key("fitting", f"params/{folder}/params.npz")
        z = npz_arrays(store.get_bytes(params), store.uri(params), ("pose", "scale", "exp_coeff"))
        lmk_key = self.ctx.input_key("fitting", f"params/{folder}/lmk_3d.npy")
        return z["pose"][0], float(z["scale"][0]), z["exp_coeff"][0], npy_array(store.get_bytes(lmk_key),
                                                                                 store.uri(lmk_key))

    def __call__(self, folders: list[str], sequences: list[str]) -> Views:
        ctx, s, cams = self.ctx, self.size, self.cams
        n_f, n_c = len(folders), len(cams)
        images = np.empty((n_f, n_c, s, s, 3), np.uint8)
        masks, visible = np.empty((n_f, n_c, s, s), np.uint8), np.empty((n_f, n_c, s, s), np.uint8)
        intrinsics, extrinsics = np.empty((n_f, n_c, 3, 3)), np.empty((n_f, n_c, 3, 4))

        def load(job: tuple[int, int]) -> None:
            fi, ci = job
            folder, cam = folders[fi], cams[ci]
            images[fi, ci] = self.image("sample", f"images/{folder}/image{self.suffix}_{cam}.jpg", False)
            masks[fi, ci] = self.image("matting", f"images/{folder}/mask{self.suffix}_{cam}.jpg", True)
            visible[fi, ci] = self.image("sample", f"images/{folder}/visible{self.suffix}_{cam}.jpg", True)
            camera = ctx.input_key("sample", f"cameras/{folder}/camera_{cam}.npz")
            z = npz_arrays(ctx.store.get_bytes(camera), ctx.store.uri(camera), ("intrinsic", "extrinsic"))
            intrinsics[fi, ci] = z["intrinsic"]
            intrinsics[fi, ci, :2] *= s / self.out_size
            extrinsics[fi, ci] = z["extrinsic"][:3]

        with ThreadPoolExecutor(max(2, ctx.store.cfg.max_concurrency // 2)) as pool:
            list(pool.map(load, [(fi, ci) for fi in range(n_f) for ci in range(n_c)]))
            fits = list(pool.map(self.fit, folders))
        log.info("%s/%s: loaded %d frames x %d cameras at %d px", ctx.capture, ctx.stage, n_f, n_c, s)
        return Views(folders, cams, images, masks, visible, intrinsics, extrinsics,
                     pose=np.stack([f[0] for f in fits]), scale=fits[0][1], exp=np.stack([f[2] for f in fits]),
                     landmarks_3d=np.stack([f[3] for f in fits]), sequences=sequences)


def split_frames(sequences: list[str], patterns: tuple[str, ...], setting: str) -> tuple[list[int], list[int]]:
    """(indices of the frames to train on, indices of the frames of the held-out sequences): self-reenactment's
    split of frames whose sequences are ``sequences``.

    Held-out sequences are never trained on; they are scored on every camera, driven by their own
    fitted expressions and poses. A pattern that matches no kept sequence is an error (a typo would
    otherwise train on what was meant to be held out).
    """
    if not patterns:
        return list(range(len(sequences))), []
    names = sorted(set(sequences))
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"{setting}: {', '.join(unmatched)} matches none of the fitted sequences "
                          f"({', '.join(names)})")
    held = [i for i, s in enumerate(sequences) if any(fnmatchcase(s, p) for p in patterns)]
    held_set = set(held)
    train = [i for i in range(len(sequences)) if i not in held_set]
    if not train:
        raise ConfigError(f"{setting}: every fitted sequence is held out; nothing is left to train on")
    log.info("%s: %d frames of %s held out, %d frames to train on", setting, len(held),
             ", ".join(sorted({sequences[i] for i in held})), len(train))
    return train, held

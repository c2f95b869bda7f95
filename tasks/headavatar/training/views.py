"""Multiview training data of one capture, loaded once from stages 2-4 into memory (uint8).

Both training stages read the same things: per frame and camera the image, the matte and the
visibility mask at one resolution, the camera, and per frame the stage-4 fit and its sequence
(for the held-out-sequence split, :func:`split_sequences`).
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

    def subset(self, frames: list[int]) -> Views:
        """The given frames (indices into ``folders``), every camera."""
        f = np.asarray(frames, dtype=np.int64)
        return Views([self.folders[i] for i in frames], list(self.cameras), self.images[f], self.masks[f],
                     self.visible[f], self.intrinsics[f], self.extrinsics[f], self.pose[f], self.scale, self.exp[f],
                     self.landmarks_3d[f], [self.sequences[i] for i in frames] if self.sequences else [])

    def tensors(self, frames: torch.Tensor, cams: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch of (frame, camera) pairs as float tensors on ``device``."""
        f, c = frames.numpy(), cams.numpy()

        def t(a: np.ndarray, scale: float = 1.0) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.float32) * scale

        return {"image": t(self.images[f, c], 1 / 255), "mask": t(self.masks[f, c], 1 / 255),
                "visible": t(self.visible[f, c], 1 / 255), "K": t(self.intrinsics[f, c]),
                "E": t(self.extrinsics[f, c]), "pose": t(self.pose[f]), "exp": t(self.exp[f]),
                "landmarks_3d": t(self.landmarks_3d[f])}


def load_views(ctx: StageContext, size: int, lowres: bool) -> Views:
    """Every fitted frame x camera at ``size`` pixels (from the low-res or full-size images)."""
    index = json.loads(ctx.store.get_bytes(ctx.input_key("sample", FRAMES_INDEX)))
    fitted = {f.split("/")[1] for f in ctx.upstream["fitting"].files if f.startswith("params/")}
    folders = [f["folder"] for f in index["frames"] if f["folder"] in fitted]
    if not folders:
        raise UpstreamMissing(f"stage 'fitting' fitted no frame of {ctx.capture}")
    cams = list(ctx.config.capture.cameras)
    out_size = ctx.config.extract.output_size
    suffix = "_lowres" if lowres else ""

    def image(stage: str, rel: str, gray: bool) -> np.ndarray:
        img = decode_image(ctx.store.get_bytes(ctx.input_key(stage, rel)), rel)
        if img.shape[0] != size:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        return img[..., 0] if gray else img[..., ::-1]

    def load(job: tuple[str, str]) -> tuple[np.ndarray, ...]:
        folder, cam = job
        rgb = image("sample", f"images/{folder}/image{suffix}_{cam}.jpg", False)
        mask = image("matting", f"images/{folder}/mask{suffix}_{cam}.jpg", True)
        vis = image("sample", f"images/{folder}/visible{suffix}_{cam}.jpg", True)
        camera = ctx.input_key("sample", f"cameras/{folder}/camera_{cam}.npz")
        z = npz_arrays(ctx.store.get_bytes(camera), ctx.store.uri(camera), ("intrinsic", "extrinsic"))
        k = z["intrinsic"].astype(np.float64).copy()
        e = z["extrinsic"][:3].astype(np.float64)
        k[:2] *= size / out_size
        return rgb, mask, vis, k, e

    def fit(folder: str) -> tuple[np.ndarray, ...]:
        params = ctx.input_key("fitting", f"params/{folder}/params.npz")
        z = npz_arrays(ctx.store.get_bytes(params), ctx.store.uri(params), ("pose", "scale", "exp_coeff"))
        pose, scale, exp = z["pose"][0], float(z["scale"][0]), z["exp_coeff"][0]
        lmk_key = ctx.input_key("fitting", f"params/{folder}/lmk_3d.npy")
        lmk = npy_array(ctx.store.get_bytes(lmk_key), ctx.store.uri(lmk_key))
        return pose, scale, exp, lmk

    jobs = [(f, c) for f in folders for c in cams]
    with ThreadPoolExecutor(max(2, ctx.store.cfg.max_concurrency // 2)) as pool:
        loaded = list(pool.map(load, jobs))
        fits = list(pool.map(fit, folders))
    log.info("%s/%s: loaded %d frames x %d cameras at %d px", ctx.capture, ctx.stage, len(folders), len(cams), size)

    def stack(i: int) -> np.ndarray:
        arr = np.stack([x[i] for x in loaded])
        return arr.reshape(len(folders), len(cams), *arr.shape[1:])

    sequence_of = {f["folder"]: sequence_name(f.get("sequence", "")) for f in index["frames"]}
    return Views(folders, cams, stack(0), stack(1), stack(2), stack(3), stack(4),
                 pose=np.stack([f[0] for f in fits]), scale=fits[0][1], exp=np.stack([f[2] for f in fits]),
                 landmarks_3d=np.stack([f[3] for f in fits]), sequences=[sequence_of[f] for f in folders])


def split_sequences(views: Views, patterns: tuple[str, ...], setting: str) -> tuple[Views, Views | None]:
    """(frames to train on, frames of the held-out sequences or None): self-reenactment's split.

    Held-out sequences are never trained on; they are scored on every camera, driven by their own
    fitted expressions and poses. A pattern that matches no kept sequence is an error (a typo would
    otherwise train on what was meant to be held out).
    """
    if not patterns:
        return views, None
    names = sorted(set(views.sequences))
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ConfigError(f"{setting}: {', '.join(unmatched)} matches none of the fitted sequences "
                          f"({', '.join(names)})")
    held = [i for i, s in enumerate(views.sequences) if any(fnmatchcase(s, p) for p in patterns)]
    train = [i for i in range(len(views.folders)) if i not in set(held)]
    if not train:
        raise ConfigError(f"{setting}: every fitted sequence is held out; nothing is left to train on")
    log.info("%s: %d frames of %s held out, %d frames to train on", setting, len(held),
             ", ".join(sorted({views.sequences[i] for i in held})), len(train))
    return views.subset(train), views.subset(held)

"""Videos of a trained avatar a person would want to watch, written as H.264 mp4 with PyAV.

* ``reenactment``: the avatar driven by a sequence's fitted expressions and poses, seen from one
  camera, beside the ground truth (GT | avatar), one video frame per captured frame.
* ``turntable``: one frame of the avatar seen from a camera orbiting the head (a full turn about
  the camera's up axis through the centre of the Gaussians).

Both take any object with the trainer's ``render(frame, cam, views, known_frame, extrinsic)`` and
``targets(frame, cam, coarse, fine)`` (``GaussianHeadTrainer``), so training, the stage and
``headavatar render`` share them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import torch

from headavatar.fitting.geometry import axis_angle_to_matrix

if TYPE_CHECKING:
    from headavatar.gaussianhead.metrics import EvalSet
    from headavatar.gaussianhead.trainer import GaussianHeadTrainer


def write_mp4(frames: Iterable[np.ndarray], path: Path, fps: int = 15, crf: int = 18) -> dict[str, int]:
    """RGB uint8 frames (H, W, 3), all one size, to an H.264 (yuv420p) mp4; odd sizes are cropped to even."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = None
        for img in frames:
            h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:h, :w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"{path.name}: no frames to write")
        for packet in stream.encode(None):
            container.mux(packet)
    tmp.replace(path)  # never a half-written video under the final name
    return {"frames": count, "width": w, "height": h, "bytes": path.stat().st_size}


def to_uint8(img: torch.Tensor, height: int | None) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (h, w, 3) uint8, resized (antialiased) to ``height`` when given."""
    x = img.float().clamp(0, 1)[None]
    if height and x.shape[-2] != height:
        w = round(x.shape[-1] * height / x.shape[-2])
        x = torch.nn.functional.interpolate(x, size=(height, w), mode="bilinear", antialias=True,
                                            align_corners=False)
    return (x[0].permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def reenactment_frames(trainer: GaussianHeadTrainer, s: EvalSet, cam: int,
                       height: int | None = 1024) -> Iterator[np.ndarray]:
    """GT | avatar for every frame of the evaluation set ``s`` seen from camera ``cam``."""
    for f in sorted({f for f, _ in s.pairs}):
        _, sr = trainer.render(f, cam, s.coarse, s.known_frames)
        t = trainer.targets(f, cam, s.coarse, s.fine)
        vis = t["fine_visible"]
        yield np.hstack([to_uint8(t["fine"] * vis, height), to_uint8(sr * vis, height)])


def orbit(extrinsic: torch.Tensor, center: torch.Tensor, angle: float) -> torch.Tensor:
    """The world-to-camera (3, 4) of a camera turned by ``angle`` about its own up axis through ``center``."""
    rot_e, t_e = extrinsic[:, :3], extrinsic[:, 3]
    up = -rot_e[1]  # OpenCV cameras look along +z with +y down: row 1 is the camera's down axis in world
    r = axis_angle_to_matrix(up * angle)
    return torch.cat([rot_e @ r, (rot_e @ (center - r @ center) + t_e)[:, None]], 1)


@torch.no_grad()
def turntable_frames(trainer: GaussianHeadTrainer, frame: int, cam: int, steps: int = 72,
                     height: int | None = 1024) -> Iterator[np.ndarray]:
    """The avatar at training frame ``frame`` seen from camera ``cam`` orbiting the head in ``steps`` steps."""
    v = trainer.coarse
    splats = trainer.head.splats(v.exp[frame], v.pose[frame], v.scale, frame)
    center = splats.means.detach().float().mean(0)
    for i in range(steps):
        ext = orbit(v.E[frame, cam], center, 2 * math.pi * i / steps)
        _, sr = trainer.render(frame, cam, extrinsic=ext)
        yield to_uint8(sr, height)


def reenactment_video(trainer: GaussianHeadTrainer, s: EvalSet, cam: int, path: Path, fps: int = 15,
                      height: int | None = 1024) -> dict:
    return {**write_mp4(reenactment_frames(trainer, s, cam, height), path, fps), "set": s.name,
            "camera": s.coarse.views.cameras[cam]}


def turntable_video(trainer: GaussianHeadTrainer, frame: int, cam: int, path: Path, steps: int = 72,
                    fps: int = 24, height: int | None = 1024) -> dict:
    return {**write_mp4(turntable_frames(trainer, frame, cam, steps, height), path, fps),
            "frame": trainer.coarse.views.folders[frame], "camera": trainer.coarse.views.cameras[cam]}

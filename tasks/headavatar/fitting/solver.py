"""Joint multiview fit of a morphable model to 2D landmarks.

Unknowns: identity coefficients (shared), expression coefficients, axis-angle rotation and
translation per frame, one global scale. Objective (as the reference): confidence-weighted squared
reprojection error in units of the image size, summed over points and averaged over frames and
cameras, plus L2 on identity and expression. Only the 68 keypoint rows of the bases enter the loop,
so a step costs the same for BFM09's 36k vertices as for a toy model.

Adam alone from a zero pose is slow and can land in a mirrored minimum, so the pose starts from a
closed-form estimate (landmarks triangulated from the calibrated cameras, then a similarity fit of
the mean shape); then Adam refines pose and scale, then everything, each phase with a cosine
learning-rate decay so it settles instead of jittering at the last learning rate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from headavatar.fitting.bfm import MorphableModel
from headavatar.fitting.geometry import axis_angle_to_matrix, project, similarity, triangulate
from headavatar.settings import FittingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observations:
    """2D landmarks of F frames seen by V cameras (a camera with no face has confidence 0)."""

    points: np.ndarray  # (F, V, 68, 2) pixels
    confidence: np.ndarray  # (F, V, 68)
    intrinsics: np.ndarray  # (F, V, 3, 3)
    extrinsics: np.ndarray  # (F, V, 3, 4) world-to-camera
    image_size: float  # pixels; the loss is measured in units of it


@dataclass
class Fit:
    id_coeff: np.ndarray  # (K_id,)
    exp_coeff: np.ndarray  # (F, K_exp)
    rotation: np.ndarray  # (F, 3) axis-angle
    translation: np.ndarray  # (F, 3)
    scale: float
    landmarks_3d: np.ndarray  # (F, 68, 3) world
    projected: np.ndarray  # (F, V, 68, 2) pixels
    history: list[tuple[str, int, float]] = field(default_factory=list)

    def reprojection_error(self, obs: Observations) -> np.ndarray:
        """(F, V) mean pixel distance over the points used; NaN where the camera saw no face."""
        used = obs.confidence > 0
        dist = np.linalg.norm(self.projected - obs.points, axis=-1)
        with np.errstate(invalid="ignore"):
            return np.where(used.any(-1), (dist * used).sum(-1) / used.sum(-1), np.nan)

    def vertices(self, model: MorphableModel, frame: int) -> np.ndarray:
        """(N, 3) fitted mesh of one frame in world coordinates."""
        local = model.shape(self.id_coeff, self.exp_coeff[frame]) - model.meanshape.mean(0)
        rot = cv2.Rodrigues(self.rotation[frame].reshape(3, 1))[0]
        return self.scale * local @ rot.T + self.translation[frame]

    def pose(self) -> np.ndarray:
        """(F, 6) axis-angle + translation, the reference's ``pose`` layout."""
        return np.concatenate([self.rotation, self.translation], 1)


class KeypointModel(torch.nn.Module):
    """The model's 68 keypoints as a differentiable function of all unknowns."""

    def __init__(self, model: MorphableModel, frames: int, init: tuple[float, np.ndarray, np.ndarray],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        kp = model.keypoints
        rows = np.stack([3 * kp, 3 * kp + 1, 3 * kp + 2], 1).reshape(-1)
        centred = model.meanshape[kp] - model.meanshape.mean(0)
        t = {"dtype": dtype, "device": device}
        self.register_buffer("mean", torch.tensor(centred, **t))
        self.register_buffer("id_base", torch.tensor(model.id_base[rows], **t).reshape(68, 3, -1))
        self.register_buffer("exp_base", torch.tensor(model.exp_base[rows], **t).reshape(68, 3, -1))
        scale, rot, trans = init
        # Translation moves in units of the head's size in the world, scale in log space: the
        # learning rates then mean the same for any model units and world units.
        self.head = float(scale * np.linalg.norm(centred, axis=1).max())
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale), **t))
        self.rotation = torch.nn.Parameter(torch.tensor(rot, **t))
        self.register_buffer("t0", torch.tensor(trans, **t))
        self.dt = torch.nn.Parameter(torch.zeros(frames, 3, **t))
        self.id_coeff = torch.nn.Parameter(torch.zeros(model.id_base.shape[1], **t))
        self.exp_coeff = torch.nn.Parameter(torch.zeros(frames, model.exp_base.shape[1], **t))

    @property
    def translation(self) -> torch.Tensor:
        return self.t0 + self.head * self.dt

    def forward(self) -> torch.Tensor:
        local = self.mean + self.id_base @ self.id_coeff + torch.einsum("pck,fk->fpc", self.exp_base, self.exp_coeff)
        rot = axis_angle_to_matrix(self.rotation)
        return self.log_scale.exp() * local @ rot.transpose(-1, -2) + self.translation[:, None]


def initial_pose(model: MorphableModel, obs: Observations) -> tuple[float, np.ndarray, np.ndarray]:
    """Global scale and per-frame rotation/translation from triangulated landmarks."""
    centred = model.meanshape[model.keypoints] - model.meanshape.mean(0)
    proj = obs.intrinsics @ obs.extrinsics  # (F, V, 3, 4)
    scales, rots, trans = [], [], []
    for f in range(len(obs.points)):
        world = triangulate(obs.points[f], (obs.confidence[f] > 0).astype(np.float64), proj[f])
        ok = ~np.isnan(world).any(1)
        if ok.sum() < 4:
            raise ValueError(f"frame {f}: fewer than 4 landmarks seen by two cameras")
        s, r, t = similarity(centred[ok], world[ok])
        scales.append(s)
        rots.append(cv2.Rodrigues(r)[0].reshape(3))
        trans.append(t)
    return float(np.median(scales)), np.stack(rots), np.stack(trans)


def fit(model: MorphableModel, obs: Observations, cfg: FittingConfig, device: torch.device) -> Fit:
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    frames = len(obs.points)
    km = KeypointModel(model, frames, initial_pose(model, obs), dtype, device)
    t = {"dtype": dtype, "device": device}
    target = torch.tensor(obs.points, **t) / obs.image_size
    conf = torch.tensor(obs.confidence, **t)[..., None]
    intr, extr = torch.tensor(obs.intrinsics, **t), torch.tensor(obs.extrinsics, **t)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        points = km()
        pix = project(points[:, None], intr, extr)  # (F, V, 68, 2)
        data = (((pix / obs.image_size - target) * conf) ** 2).sum((-1, -2)).mean()
        reg = cfg.reg_id_weight * (km.id_coeff**2).sum() + cfg.reg_exp_weight * (km.exp_coeff**2).sum(-1).mean()
        return data + reg, pix

    phases = [
        ("pose", cfg.pose_steps, [{"params": [km.log_scale], "lr": cfg.scale_lr},
                                  {"params": [km.rotation, km.dt], "lr": cfg.pose_lr}]),
        ("all", cfg.all_steps, [{"params": list(km.parameters()), "lr": cfg.all_lr}]),
    ]
    history: list[tuple[str, int, float]] = []
    for name, steps, groups in phases:
        if not steps:
            continue
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=groups[0]["lr"] * 1e-3)
        prev = prev2 = math.inf
        for step in range(steps):
            loss, _ = objective()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            if step % 100 == 0 or step == steps - 1:
                history.append((name, step, value))
            if step % 500 == 0:
                log.info("fitting %s: step %d/%d loss %.4g", name, step, steps, value)
            if abs(value - prev) < cfg.tolerance and abs(value - prev2) < 10 * cfg.tolerance:
                history.append((name, step, value))
                break
            prev2, prev = prev, value

    with torch.no_grad():
        _, pix = objective()
        points = km()
        scale = km.log_scale.exp().item()

    def arr(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy()

    return Fit(id_coeff=arr(km.id_coeff), exp_coeff=arr(km.exp_coeff), rotation=arr(km.rotation),
               translation=arr(km.translation), scale=scale, landmarks_3d=arr(points),
               projected=arr(pix), history=history)

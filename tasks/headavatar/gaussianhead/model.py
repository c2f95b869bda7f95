"""The dynamic Gaussian head and the super-resolution network.

Gaussians live in the mesh head's canonical space, normalised by one scalar (the largest box
half-size, so rotations and scales stay valid). They start on the trained mesh head's neutral
surface with its features, plus extra points filling the mouth. Expression- and pose-conditioned
MLPs move them and change colour (32 channels) and attributes (scale, rotation, opacity); as in the
reference, expression acts near the face and pose away from it. The last layers start at zero, so
training starts from the mesh head. Posing into the world uses the stage-4 fit plus a learned
per-frame pose correction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from headavatar.fitting.geometry import axis_angle_to_matrix
from headavatar.meshhead.model import PositionalEncoding, mlp, run_mlp
from headavatar.render.gaussian_raster import Splats, knn_scale, quat_to_matrix
from headavatar.settings import GaussianHeadConfig


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) to unit quaternions (..., 4) wxyz (robust branch selection)."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = torch.stack([
        torch.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                     m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0],
                     m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22,
                     m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m00 - m11 + m22], -1),
    ], -2)  # (..., 4, 4): row i is 4 q_i q
    best = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    idx = best.argmax(-1, keepdim=True)[..., None].expand(*best.shape, 4)[..., :1, :]
    return nn.functional.normalize(torch.gather(candidates, -2, idx)[..., 0, :], dim=-1)


class GaussianHead(nn.Module):
    amp = False  # the trainer sets it: MLPs under bf16 autocast on CUDA, geometry in fp32
    compile = False  # the trainer sets it: ``splats`` under torch.compile on CUDA (fewer, fused kernels)

    def __init__(self, cfg: GaussianHeadConfig, n_exp: int, n_frames: int, xyz: torch.Tensor,
                 features: torch.Tensor, landmarks: torch.Tensor, center: torch.Tensor, unit: float):
        """xyz (N, 3) and landmarks (68, 3) in canonical units; features (N, F0) from the mesh head."""
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", center.float().clone())
        self.unit = float(unit)
        xyz = (xyz - center) / unit
        lm = (landmarks - center) / unit
        if cfg.mouth_points:
            mouth = lm[48:66]
            mid = mouth.mean(0).clone()
            mid[2] = mouth[:, 2].min()
            spread = (mouth - mid).abs().max(0).values
            g = torch.Generator().manual_seed(cfg.seed)
            extra = (torch.rand(cfg.mouth_points, 3, generator=g) - 0.5) * 1.6 * spread + mid
            xyz = torch.cat([xyz, extra])
            features = torch.cat([features, torch.zeros(cfg.mouth_points, features.shape[1])])
        n = len(xyz)
        self.xyz = nn.Parameter(xyz.float())
        self.features = nn.Parameter(features.float())
        self.register_buffer("landmarks", lm.float())
        self.log_scales = nn.Parameter(torch.log(knn_scale(xyz.float()))[:, None].repeat(1, 3))
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1
        self.quats = nn.Parameter(quats)
        self.opacity_logit = nn.Parameter(torch.full((n,), math.log(0.3 / 0.7)))
        self.delta_pose = nn.Parameter(torch.zeros(n_frames, 6))
        self.enc = PositionalEncoding(cfg.pos_freqs)
        f, e, h = features.shape[1], self.enc.dim, cfg.hidden
        self.exp_color = mlp(f + n_exp, h, 2, cfg.features, zero_last=False)
        self.pose_color = mlp(f + e * 2, h // 2, 1, cfg.features, zero_last=False)
        self.exp_attributes = mlp(f + n_exp, h, 3, 8)
        self.pose_attributes = mlp(f + e * 2, h // 2, 2, 8)
        self.exp_deform = mlp(e + n_exp, h, 5, 3)
        self.pose_deform = mlp(e + e * 2, h, 2, 3)

    def pose_encoding(self, pose: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.enc(pose[:3]), self.enc(pose[3:])], -1)

    def splats(self, exp: torch.Tensor, pose: torch.Tensor, scale: torch.Tensor, frame: int | None) -> Splats:
        """World-space Gaussians for one expression (K,), fitted pose (6,) and scale; ``frame`` picks the
        learned pose correction (None for unseen frames)."""
        if frame is not None:
            pose = pose + self.delta_pose[frame]
        fn = self._splats
        if self.compile and exp.is_cuda:  # the number of Gaussians never changes: static shapes, one graph
            if "_compiled_splats" not in self.__dict__:
                self.__dict__["_compiled_splats"] = torch.compile(self._splats)
            fn = self.__dict__["_compiled_splats"]
        return Splats(*fn(exp, pose, scale))

    def _splats(self, exp: torch.Tensor, pose: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.xyz)
        feat = torch.tanh(self.features)
        dist = torch.cdist(self.xyz.detach(), self.landmarks).min(-1).values[:, None]
        w_exp = ((self.cfg.far_from_face - dist) / max(self.cfg.far_from_face - self.cfg.near_face, 1e-6)).clamp(0, 1)
        w_pose = 1 - w_exp
        pe = self.pose_encoding(pose)[None].expand(n, -1)
        ex = exp[None].expand(n, -1)
        fe, fp = torch.cat([feat, ex], -1), torch.cat([feat, pe], -1)
        color = run_mlp(self.exp_color, fe, self.amp) * w_exp + run_mlp(self.pose_color, fp, self.amp) * w_pose
        attrs = (run_mlp(self.exp_attributes, fe, self.amp) * w_exp
                 + run_mlp(self.pose_attributes, fp, self.amp) * w_pose) * self.cfg.attributes_scale
        enc = self.enc(self.xyz)
        delta = (torch.tanh(run_mlp(self.exp_deform, torch.cat([enc, ex], -1), self.amp)) * w_exp
                 + torch.tanh(run_mlp(self.pose_deform, torch.cat([enc, pe], -1), self.amp)) * w_pose
                 ) * self.cfg.deform_scale
        canonical = self.center + self.unit * (self.xyz + delta)
        rot = axis_angle_to_matrix(pose[:3])
        means = scale * canonical @ rot.T + pose[3:]
        local = quat_to_matrix(self.quats + attrs[:, 3:7])
        quats = matrix_to_quat(rot @ local)
        scales = scale * self.unit * torch.exp(self.log_scales + attrs[:, :3])
        opacities = torch.sigmoid(self.opacity_logit + attrs[:, 7])
        return means, quats, scales, opacities, color


def _shuffle_last(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pixel shuffle of a channels-last (B, C r², h, w) tensor into a channels-last (B, C, h r, w r) one."""
    b, c4, h, w = x.shape
    c = c4 // (r * r)
    y = x.permute(0, 2, 3, 1).reshape(b, h, w, c, r, r).permute(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c)
    return y.permute(0, 3, 1, 2)


def _unshuffle_last(g: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse of :func:`_shuffle_last`, as a channels-last tensor whatever ``g``'s layout."""
    b, c, hr, wr = g.shape
    h, w = hr // r, wr // r
    y = g.permute(0, 2, 3, 1).reshape(b, h, r, w, r, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h, w, c * r * r)
    return y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class _ShuffleLast(torch.autograd.Function):
    """:func:`_shuffle_last` whose gradient is channels-last too, meant to spare cuDNN's backward of the
    32 -> 128 convolutions a copy of its incoming gradient (1.4 ms a step on an H100). Compiled in the trainer
    it is not what runs, and the copy remains (docs/gpu.md, third session, says why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: int) -> torch.Tensor:
        ctx.r = r
        return _shuffle_last(x, r)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _unshuffle_last(g, ctx.r), None


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """``nn.PixelShuffle(r)`` that keeps a channels-last tensor channels-last, its gradient too (one copy, no
    layout change: cuDNN's NCHW<->NHWC transposes around every bf16 convolution cost more than the
    convolutions' own memory traffic at 2048²)."""
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return nn.functional.pixel_shuffle(x, r)
    return _ShuffleLast.apply(x, r)


class PixelShuffle(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(x, self.r)


class SuperResolution(nn.Module):
    """32-channel coarse render -> RGB at ``factor`` x the size; the first 3 channels, upsampled,
    are the starting point, so the network learns a residual. On CUDA the trainer keeps it
    channels-last (the rasteriser's (H, W, C) output already is)."""

    def __init__(self, channels_in: int, width: int, factor: int):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"super-resolution factor must be a power of two, got {factor}")
        layers: list[nn.Module] = [nn.Conv2d(channels_in, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(width, width * 4, 3, padding=1), PixelShuffle(2), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(width, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h * factor, w * factor). Not clamped: a clamp would cut the gradient
        of every pixel outside [0, 1]; clamp for display and metrics."""
        base = nn.functional.interpolate(x[:, :3], scale_factor=self.factor, mode="bilinear", align_corners=False)
        return base + self.net(x)

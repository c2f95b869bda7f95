"""Camera and rotation helpers in plain PyTorch/NumPy (no pytorch3d needed)."""

from __future__ import annotations

import numpy as np
import torch


def axis_angle_to_matrix(rv: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, batched (..., 3) -> (..., 3, 3); smooth at zero (Taylor terms)."""
    theta2 = (rv * rv).sum(-1, keepdim=True)[..., None]
    theta = theta2.clamp_min(1e-12).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    x, y, z = rv.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rv.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rv.dtype, device=rv.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def project(points: torch.Tensor, intrinsic: torch.Tensor, extrinsic: torch.Tensor) -> torch.Tensor:
    """World points (..., P, 3) through world-to-camera (..., 3, 4) and K (..., 3, 3) to pixels (..., P, 2)."""
    cam = points @ extrinsic[..., :3, :3].transpose(-1, -2) + extrinsic[..., None, :3, 3]
    pix = cam @ intrinsic.transpose(-1, -2)
    return pix[..., :2] / pix[..., 2:3].clamp_min(1e-9)


def triangulate(points: np.ndarray, weights: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """Linear (DLT) triangulation of P points seen by V cameras.

    points (V, P, 2) pixels, weights (V, P) (0 = not seen), projections (V, 3, 4) = K @ [R|t].
    Returns (P, 3); points seen by fewer than two cameras come back as NaN.
    """
    rows = np.concatenate([
        points[..., 0:1] * projections[:, None, 2] - projections[:, None, 0],
        points[..., 1:2] * projections[:, None, 2] - projections[:, None, 1],
    ], 0) * np.concatenate([weights, weights], 0)[..., None]  # (2V, P, 4)
    a = rows.transpose(1, 0, 2)  # (P, 2V, 4)
    _, _, vt = np.linalg.svd(a)
    x = vt[:, -1]
    out = x[:, :3] / x[:, 3:4]
    out[(weights > 0).sum(0) < 2] = np.nan
    return out


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares s, R, t with dst ~ s R src + t (Umeyama 1991); src, dst (P, 3)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(xd.T @ xs / len(src))
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / (xs**2).sum(1).mean())
    return scale, rot, mu_d - scale * rot @ mu_s

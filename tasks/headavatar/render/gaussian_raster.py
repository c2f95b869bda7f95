"""Differentiable 3D Gaussian splatting with any number of channels (GHA renders 32-channel features).

Backends behind one interface: ``gsplat`` (Apache-2.0, CUDA; the default on GPUs),
``diff_gaussian_rasterization`` is not wrapped here (non-commercial licence; see the README), and
``torch``: the same image formation in plain PyTorch for CPUs (tests, demo) and as the reference
the CUDA backend is checked against. Conventions follow 3DGS/gsplat: EWA projection with a 0.3 px²
low-pass, 3-sigma footprints, alpha = min(0.99, opacity * G), contributions below 1/255 dropped,
front-to-back compositing in depth order. Pixel centres are at integer coordinates (OpenCV), so
the gsplat backend shifts the principal point by half a pixel.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

EPS2D = 0.3
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
NEAR = 0.01


@dataclass
class Splats:
    means: torch.Tensor  # (N, 3) world
    quats: torch.Tensor  # (N, 4) wxyz, any norm
    scales: torch.Tensor  # (N, 3) standard deviations (not log)
    opacities: torch.Tensor  # (N,) in (0, 1)
    colors: torch.Tensor  # (N, C)


class GaussianRasterizer(ABC):
    name: str

    @abstractmethod
    def __call__(self, splats: Splats, viewmat: torch.Tensor, intrinsic: torch.Tensor, width: int,
                 height: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, C) image on a black background and (H, W) alpha for one camera (world-to-camera 4x4)."""


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*q.shape[:-1], 3, 3)


def project(splats: Splats, viewmat: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Screen means (N, 2), depths (N,), conics (N, 3: a, b, c of the inverse 2D covariance), radii (N,)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    cam = splats.means @ rot.T + trans
    z = cam[:, 2].clamp_min(NEAR)
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    mean2d = torch.stack([fx * cam[:, 0] / z + cx, fy * cam[:, 1] / z + cy], -1)
    zeros = torch.zeros_like(z)
    jac = torch.stack([fx / z, zeros, -fx * cam[:, 0] / z**2,
                       zeros, fy / z, -fy * cam[:, 1] / z**2], -1).reshape(-1, 2, 3)
    m = quat_to_matrix(splats.quats) * splats.scales[:, None, :]  # R S
    cov_cam = rot @ (m @ m.transpose(1, 2)) @ rot.T
    cov2d = jac @ cov_cam @ jac.transpose(1, 2)
    a, b, c = cov2d[:, 0, 0] + EPS2D, cov2d[:, 0, 1], cov2d[:, 1, 1] + EPS2D
    det = (a * c - b * b).clamp_min(1e-12)
    conic = torch.stack([c / det, -b / det, a / det], -1)
    mid = 0.5 * (a + c)
    radius = 3 * torch.sqrt(mid + torch.sqrt((mid * mid - det).clamp_min(0.1)))
    return mean2d, cam[:, 2], conic, radius


class TorchGaussianRasterizer(GaussianRasterizer):
    """(splat, pixel) pairs inside each 3-sigma box, sorted by pixel then depth, composited with a
    segmented cumulative sum of log(1 - alpha) in float64 (exact transmittance, differentiable)."""

    name = "torch"

    def __call__(self, splats: Splats, viewmat: torch.Tensor, intrinsic: torch.Tensor, width: int,
                 height: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean2d, depth, conic, radius = project(splats, viewmat, intrinsic)
        with torch.no_grad():
            ok = (depth > NEAR) & (radius > 0)
            lo_x = (mean2d[:, 0] - radius).ceil().clamp(0, width).long()
            hi_x = (mean2d[:, 0] + radius).floor().clamp(-1, width - 1).long()
            lo_y = (mean2d[:, 1] - radius).ceil().clamp(0, height).long()
            hi_y = (mean2d[:, 1] + radius).floor().clamp(-1, height - 1).long()
            span_x, span_y = (hi_x - lo_x + 1).clamp_min(0), (hi_y - lo_y + 1).clamp_min(0)
            counts = span_x * span_y * ok
            g = torch.repeat_interleave(torch.arange(len(depth), device=depth.device), counts)
            local = torch.arange(len(g), device=depth.device) - (torch.cumsum(counts, 0) - counts)[g]
            px = lo_x[g] + local % span_x[g].clamp_min(1)
            py = lo_y[g] + local // span_x[g].clamp_min(1)
            pixel = py * width + px
            order = torch.argsort(depth.detach()[g], stable=True)
            order = order[torch.argsort(pixel[order], stable=True)]
            g, px, py, pixel = g[order], px[order], py[order], pixel[order]
        d = torch.stack([px, py], -1).to(mean2d.dtype) - mean2d[g]
        cg = conic[g]
        power = -0.5 * (cg[:, 0] * d[:, 0] ** 2 + 2 * cg[:, 1] * d[:, 0] * d[:, 1] + cg[:, 2] * d[:, 1] ** 2)
        alpha = (splats.opacities[g] * torch.exp(power.clamp_max(0))).clamp_max(ALPHA_MAX)
        alpha = alpha * (alpha >= ALPHA_MIN)
        log_t = torch.log1p(-alpha.double())
        cum = torch.cumsum(log_t, 0) - log_t  # exclusive, over all pairs
        with torch.no_grad():
            _, counts_px = torch.unique_consecutive(pixel, return_counts=True)
            starts = torch.repeat_interleave(torch.cumsum(counts_px, 0) - counts_px, counts_px)
        trans = torch.exp(cum - cum[starts]).to(alpha.dtype)  # transmittance before this splat
        weight = alpha * trans
        n_pix = width * height
        image = torch.zeros(n_pix, splats.colors.shape[1], dtype=splats.colors.dtype, device=depth.device)
        image = image.index_add(0, pixel, weight[:, None] * splats.colors[g])
        acc = torch.zeros(n_pix, dtype=weight.dtype, device=depth.device).index_add(0, pixel, weight)
        return image.reshape(height, width, -1), acc.reshape(height, width)


class GsplatRasterizer(GaussianRasterizer):
    name = "gsplat"

    def __init__(self) -> None:
        import gsplat

        self.gsplat = gsplat

    def __call__(self, splats: Splats, viewmat: torch.Tensor, intrinsic: torch.Tensor, width: int,
                 height: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = intrinsic.clone()
        k[0, 2] = k[0, 2] + 0.5  # gsplat samples pixel (i, j) at (j + 0.5, i + 0.5)
        k[1, 2] = k[1, 2] + 0.5
        colors, alphas, _ = self.gsplat.rasterization(
            splats.means, torch.nn.functional.normalize(splats.quats, dim=-1), splats.scales, splats.opacities,
            splats.colors, viewmat[None], k[None], width, height, near_plane=NEAR, eps2d=EPS2D, packed=False)
        return colors[0], alphas[0, ..., 0]


def build_gaussian_rasterizer(name: str, device: torch.device) -> GaussianRasterizer:
    """``auto``: gsplat on CUDA when installed, else the PyTorch reference."""
    if name == "auto":
        name = "gsplat" if device.type == "cuda" and _has("gsplat") else "torch"
    if name == "gsplat":
        return GsplatRasterizer()
    return TorchGaussianRasterizer()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def knn_scale(points: torch.Tensor, k: int = 3, chunk: int = 4096) -> torch.Tensor:
    """Root mean squared distance to the k nearest other points (3DGS's scale init, without simple-knn)."""
    out = []
    for s in range(0, len(points), chunk):
        d2 = torch.cdist(points[s : s + chunk], points).pow(2)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = math.inf
        out.append(d2.topk(k, largest=False).values.mean(-1).clamp_min(1e-12).sqrt())
    return torch.cat(out)

"""Differentiable 3D Gaussian splatting with any number of channels (GHA renders 32-channel features).

Backends behind one interface: ``gsplat`` (Apache-2.0, CUDA; the default on GPUs), ``dgr``: the
reference's own diff-gaussian-rasterization built with ``NUM_CHANNELS`` = 32 (NON-COMMERCIAL
licence; used only when installed and asked for), and ``torch``: the same image formation in plain
PyTorch for CPUs (tests, demo) and as the reference the CUDA backends are checked against.
Conventions follow 3DGS/gsplat: EWA projection with a 0.3 px² low-pass, 3-sigma footprints,
alpha = min(0.99, opacity * G), contributions below 1/255 dropped, front-to-back compositing in
depth order. Pixel centres are at integer coordinates (OpenCV), so
the gsplat backend shifts the principal point by half a pixel.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from headavatar.devices import installed
from headavatar.errors import PipelineError

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
                 height: int, with_alpha: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H, W, C) image on a black background and (H, W) alpha for one camera (world-to-camera 4x4).

        ``with_alpha=False`` lets a backend that gets alpha only from an extra pass skip it (None)."""


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
                 height: int, with_alpha: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
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
                 height: int, with_alpha: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = intrinsic.clone()
        k[0, 2] = k[0, 2] + 0.5  # gsplat samples pixel (i, j) at (j + 0.5, i + 0.5)
        k[1, 2] = k[1, 2] + 0.5
        colors, alphas, _ = self.gsplat.rasterization(
            splats.means, torch.nn.functional.normalize(splats.quats, dim=-1), splats.scales, splats.opacities,
            splats.colors, viewmat[None], k[None], width, height, near_plane=NEAR, eps2d=EPS2D, packed=False)
        return colors[0], alphas[0, ..., 0]


def projection_matrix(intrinsic: torch.Tensor, width: int, height: int, near: float = NEAR,
                      far: float = 100.0) -> torch.Tensor:
    """4x4 camera-to-clip matrix for 3DGS-style rasterisers, from an OpenCV intrinsic matrix.

    3DGS maps NDC to pixels as ``((ndc + 1) * S - 1) / 2``, so pixel centres are at integer
    coordinates as in OpenCV; the principal point may be anywhere (the reference's FoV-only matrix
    assumes it is centred). Depth maps to [0, 1] between ``near`` and ``far``."""
    fx, fy, cx, cy = (float(v) for v in (intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]))
    p = torch.zeros(4, 4, dtype=torch.float32, device=intrinsic.device)
    p[0, 0], p[0, 2] = 2 * fx / width, (2 * cx + 1) / width - 1
    p[1, 1], p[1, 2] = 2 * fy / height, (2 * cy + 1) / height - 1
    p[2, 2], p[2, 3] = far / (far - near), -far * near / (far - near)
    p[3, 2] = 1.0
    return p


class DiffGaussianRasterizer(GaussianRasterizer):
    """graphdeco-inria/diff-gaussian-rasterization (the reference's backend, non-commercial licence).

    Its channel count is a compile-time constant; it is read once from the output of a one-splat
    render. Fewer model channels are padded, with a spare channel of ones carrying alpha; as many
    channels as compiled leave no room, so alpha then takes a second, gradient-free pass. It culls
    splats nearer than 0.2 (scene units) to the camera: GHA scenes are metres away."""

    name = "dgr"

    def __init__(self, device: torch.device) -> None:
        import diff_gaussian_rasterization as dgr

        self.dgr = dgr
        k = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]], device=device)
        view = torch.eye(4, device=device)
        view[2, 3] = 1.0
        one = Splats(torch.zeros(1, 3, device=device), torch.tensor([[1.0, 0, 0, 0]], device=device),
                     torch.full((1, 3), 0.1, device=device), torch.ones(1, device=device),
                     torch.zeros(1, 1024, device=device))  # wider than any build reads
        with torch.no_grad():
            self.channels = int(self._render(one, view, k, 8, 8, one.colors.shape[1]).shape[0])

    def _render(self, splats: Splats, viewmat: torch.Tensor, intrinsic: torch.Tensor, width: int, height: int,
                bg_channels: int) -> torch.Tensor:
        dev = splats.means.device
        settings = self.dgr.GaussianRasterizationSettings(
            image_height=height, image_width=width, tanfovx=width / (2 * float(intrinsic[0, 0])),
            tanfovy=height / (2 * float(intrinsic[1, 1])), bg=torch.zeros(bg_channels, device=dev),
            scale_modifier=1.0, viewmatrix=viewmat.T.contiguous(),
            projmatrix=(projection_matrix(intrinsic, width, height) @ viewmat).T.contiguous(), sh_degree=0,
            campos=torch.linalg.inv(viewmat)[:3, 3].contiguous(), prefiltered=False, debug=False)
        image, _ = self.dgr.GaussianRasterizer(settings)(
            means3D=splats.means, means2D=torch.zeros_like(splats.means), opacities=splats.opacities[:, None],
            colors_precomp=splats.colors, scales=splats.scales,
            rotations=torch.nn.functional.normalize(splats.quats, dim=-1))
        return image

    def __call__(self, splats: Splats, viewmat: torch.Tensor, intrinsic: torch.Tensor, width: int,
                 height: int, with_alpha: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, c = splats.colors.shape
        if c > self.channels:
            raise PipelineError(f"diff-gaussian-rasterization was built with NUM_CHANNELS={self.channels}; "
                             f"the model renders {c} channels: rebuild it with NUM_CHANNELS={c}")
        colors = splats.colors
        if c < self.channels:
            pad = splats.colors.new_zeros(n, self.channels - c)
            pad[:, 0] = 1.0
            colors = torch.cat([colors, pad], 1)
        image = self._render(Splats(splats.means, splats.quats, splats.scales, splats.opacities, colors), viewmat,
                             intrinsic, width, height, self.channels)
        alpha = image[c] if c < self.channels else None
        if with_alpha and alpha is None:
            with torch.no_grad():
                ones = Splats(splats.means, splats.quats, splats.scales, splats.opacities, torch.ones_like(colors))
                alpha = self._render(ones, viewmat, intrinsic, width, height, self.channels)[0]
        return image[:c].permute(1, 2, 0), alpha if with_alpha else None


def build_gaussian_rasterizer(name: str, device: torch.device) -> GaussianRasterizer:
    """``auto``: gsplat on CUDA when installed, else the PyTorch reference. ``dgr`` only when asked."""
    if name == "auto":
        name = "gsplat" if device.type == "cuda" and installed("gsplat") else "torch"
    if name in ("gsplat", "dgr"):
        if device.type != "cuda":
            raise PipelineError(f"gaussianhead.rasterizer={name} needs a CUDA device (got {device.type})")
        module = {"gsplat": "gsplat", "dgr": "diff_gaussian_rasterization"}[name]
        if not installed(module):
            raise PipelineError(f"gaussianhead.rasterizer={name}: the Python package {module} is not installed")
        return GsplatRasterizer() if name == "gsplat" else DiffGaussianRasterizer(device)
    return TorchGaussianRasterizer()



def knn_scale(points: torch.Tensor) -> torch.Tensor:
    """Root mean squared distance to the 3 nearest other points (3DGS's scale init).

    simple-knn's ``distCUDA2`` when it is installed and a GPU is present, else :func:`exact_knn_scale`."""
    if torch.cuda.is_available() and installed("simple_knn"):
        from simple_knn._C import distCUDA2

        return distCUDA2(points.float().cuda()).clamp_min(1e-12).sqrt().to(points.device, points.dtype)
    return exact_knn_scale(points)


def exact_knn_scale(points: torch.Tensor, k: int = 3, chunk: int = 4096) -> torch.Tensor:
    """Root mean squared distance to the k nearest other points: chunked distances in PyTorch, on
    the points' own device."""
    out = []
    for s in range(0, len(points), chunk):
        d2 = torch.cdist(points[s : s + chunk], points).pow(2)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = math.inf
        out.append(d2.topk(k, largest=False).values.mean(-1).clamp_min(1e-12).sqrt())
    return torch.cat(out)

"""The mesh head: a neutral head as SDF + features over a deformable tet grid, animated by MLPs.

Coordinates: the model works in a normalised box [-1, 1]^3 laid over the canonical (fitted
3DMM, model units) space; ``to_canonical`` maps back. Posing a canonical point into the world
uses the stage-4 fit of the frame: ``world = scale * R @ x + t``.

- ``geo``: position -> SDF correction, grid deformation (at most half a cell) and features. Its
  last layer starts at zero, so training starts from the ellipsoid that bounds the fitted head
  (the reference pretrains its MLP towards a sphere instead).
- ``exp_deform`` / ``pose_deform``: offsets from the expression / head pose; expression acts near
  the face, pose far from it (neck, hair), blended by the distance to the nearest landmark.
- ``exp_color``: colour from features, position and expression.
- ``landmarks``: the 68 landmarks of the neutral head, learned; expression-deformed, they must
  land on the stage-4 landmarks, and the SDF must vanish there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from headavatar.meshhead.tets import cube_tet_grid, marching_tets, tet_edges
from headavatar.render.indexing import gather
from headavatar.settings import MeshHeadConfig


class PositionalEncoding(nn.Module):
    def __init__(self, freqs: int):
        super().__init__()
        self.register_buffer("scales", (2.0 ** torch.arange(freqs)) * math.pi, persistent=False)
        self.dim = 3 + 6 * freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = (x[..., None] * self.scales).flatten(-2)
        return torch.cat([x, xs.sin(), xs.cos()], -1)


def mlp(inputs: int, hidden: int, layers: int, outputs: int, zero_last: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.Softplus(beta=100)]
        width = hidden
    last = nn.Linear(width, outputs)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


def run_mlp(net: nn.Module, x: torch.Tensor, amp: bool) -> torch.Tensor:
    """``net(x)`` in fp32, or with its matmuls in bf16 (CUDA autocast) when ``amp``; geometry around the MLPs
    stays fp32 either way (a bf16 world transform would move points by millimetres)."""
    if amp and x.is_cuda:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x).float()
    return net(x)


class MeshHead(nn.Module):
    amp = False  # the trainer sets it: MLPs under bf16 autocast on CUDA
    compile = False  # the trainer sets it: the MLP passes under torch.compile on CUDA (fewer, fused kernels)

    def __init__(self, cfg: MeshHeadConfig, n_exp: int, center: torch.Tensor, half: torch.Tensor,
                 ellipsoid: torch.Tensor, landmarks: torch.Tensor):
        """center/half: the box in canonical units; ellipsoid: semi-axes of the initial head and
        landmarks (68, 3): initial neutral landmarks, both in box units."""
        super().__init__()
        self.cfg = cfg
        pos, tets = cube_tet_grid(cfg.grid_resolution)
        self.register_buffer("grid", pos)
        self.register_buffer("tets", tets)
        self._edges: tuple[torch.Tensor, torch.Tensor] | None = None  # tet_edges of the grid, made on first use
        # Copies: buffers must never share storage (load_state_dict writes into them in place).
        self.register_buffer("box_center", center.float().clone())
        self.register_buffer("box_half", half.float().clone())
        self.register_buffer("ellipsoid", ellipsoid.float().clone())
        self.enc = PositionalEncoding(cfg.pos_freqs)
        e, h = self.enc.dim, cfg.hidden
        self.geo = mlp(e, h, cfg.geo_layers, 4 + cfg.features)
        self.exp_deform = mlp(e + n_exp, h, 3, 3)
        self.pose_deform = mlp(e + 6, max(8, h // 2), 2, 3)
        self.exp_color = mlp(cfg.features + e + n_exp, h, 2, 3, zero_last=False)
        self.landmarks = nn.Parameter(landmarks.float().clone())

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        return self.box_center + self.box_half * x

    def to_box(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.box_center) / self.box_half

    def prior_sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Approximate signed distance to the initial ellipsoid (box units)."""
        return ((x / self.ellipsoid).norm(dim=-1) - 1) * self.ellipsoid.min()

    def _compiled(self, name: str, fn: Callable, x: torch.Tensor, dynamic: bool) -> Callable:
        """``fn``, or on CUDA when ``compile`` is set its ``torch.compile`` (made once; ``dynamic``: sizes vary)."""
        if not (self.compile and x.is_cuda):
            return fn
        cache = self.__dict__.setdefault("_compiled_fns", {})
        if name not in cache:
            cache[name] = torch.compile(fn, dynamic=dynamic)
        return cache[name]

    def query(self, x: torch.Tensor, static: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDF (...,), grid deformation (..., 3) and features (..., F) at box points (``static``: the
        number of points never changes, e.g. the grid)."""
        return self._compiled("query_static" if static else "query", self._query, x, not static)(x)

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = run_mlp(self.geo, self.enc(x), self.amp)
        sdf = self.prior_sdf(x) + out[..., 0]
        deform = torch.tanh(out[..., 1:4]) / self.cfg.grid_resolution  # at most half a cell (cell = 2/res)
        return sdf, deform, out[..., 4:]

    def grid_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``tet_edges`` of the grid (fixed; derived, so not saved), made once on the grid's device."""
        if self._edges is None or self._edges[0].device != self.tets.device:
            self._edges = tet_edges(self.tets, len(self.grid))
        return self._edges

    def neutral(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Neutral surface (verts in box units, faces) and the grid deformation (for regularisation)."""
        verts, faces, deform, _ = self.neutral_and_landmark_sdf()
        return verts, faces, deform

    def neutral_and_landmark_sdf(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``neutral()`` and the SDF (68,) at the landmarks, from one pass of the geometry MLP."""
        n = len(self.grid)
        sdf, deform, _ = self.query(torch.cat([self.grid, self.landmarks]), static=True)
        verts, faces = marching_tets(self.grid + deform[:n], sdf[:n], self.tets, self.grid_edges())
        return verts, faces, deform[:n], sdf[n:]

    def offsets(self, points: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """(B, M, 3) box-unit offsets of box points (M, 3) or (B, M, 3) for expression (B, K) and pose (B, 6)."""
        return self._compiled("offsets", self._offsets, points, True)(points, exp, pose)

    def _offsets(self, points: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        b = exp.shape[0]
        pts = points.expand(b, -1, -1) if points.dim() == 2 else points
        enc = self.enc(pts)
        m = pts.shape[1]
        exp_off = run_mlp(self.exp_deform, torch.cat([enc, exp[:, None].expand(-1, m, -1)], -1), self.amp)
        pose_off = run_mlp(self.pose_deform, torch.cat([enc, pose[:, None].expand(-1, m, -1)], -1), self.amp)
        lm = self.landmarks.detach()
        dist = torch.cdist(pts.detach(), lm.expand(b, -1, -1)).min(-1).values
        far = ((dist - self.cfg.near_face) / max(self.cfg.far_from_face - self.cfg.near_face, 1e-6)).clamp(0, 1)
        scale = self.cfg.deform_scale
        return torch.tanh(exp_off) * scale * (1 - far[..., None]) + torch.tanh(pose_off) * scale * far[..., None]

    def colors(self, points: torch.Tensor, features: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """(B, M, 3) colours in [0, 1] of box points (M, 3) with features (M, F) under expressions (B, K)."""
        return self._compiled("colors", self._colors, points, True)(points, features, exp)

    def _colors(self, points: torch.Tensor, features: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        b, m = exp.shape[0], points.shape[0]
        x = torch.cat([features.expand(b, -1, -1), self.enc(points).expand(b, -1, -1),
                       exp[:, None].expand(-1, m, -1)], -1)
        return torch.sigmoid(run_mlp(self.exp_color, x, self.amp))


@functools.cache
def compiled(fn: Callable, enabled: bool) -> Callable:
    """``torch.compile(fn, dynamic=True)`` when ``enabled`` (made once per function), else ``fn``."""
    return torch.compile(fn, dynamic=True) if enabled else fn


def laplacian(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared uniform-Laplacian of a mesh (the reference's regulariser)."""
    term = torch.zeros_like(verts)
    count = torch.zeros_like(verts[:, :1])
    for i in range(3):
        a, b, c = faces[:, i], faces[:, (i + 1) % 3], faces[:, (i + 2) % 3]
        term = term.index_add(0, a, gather(verts, b) + gather(verts, c) - 2 * gather(verts, a))
        count = count.index_add(0, a, torch.full_like(verts[a, :1], 2.0))
    return ((term / count.clamp_min(1)) ** 2).mean()


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(..., N, 3) area-weighted unit normals of (..., N, 3) vertices."""
    v0, v1, v2 = (gather(verts, faces[:, i], dim=-2) for i in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    n = torch.zeros_like(verts)
    for i in range(3):
        n = n.index_add(-2, faces[:, i], fn)
    return torch.nn.functional.normalize(n, dim=-1)

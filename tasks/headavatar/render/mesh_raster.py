"""Differentiable triangle-mesh rasterisation.

The interface takes vertices already in pixel coordinates plus camera depth, so any backend can sit
behind it: ``torch`` (pure PyTorch, anywhere) and ``pytorch3d`` (BSD; its CUDA rasteriser finds
the faces near each pixel, the differentiable part stays the PyTorch code below, so the two differ
only in which faces reach a pixel's soft silhouette).

The pure-PyTorch backend is exact where it matters for training and cheap enough for the CPU
demo: visibility is a hard z-buffer (no gradient, as in every rasteriser); attributes are
interpolated with perspective-correct barycentrics of the visible face, which are differentiable
in the vertex positions; the silhouette is soft (SoftRas-style: a sigmoid of the signed distance to
every face within reach, combined as 1 - prod(1 - p)), so edges move under image losses. Unlike
SoftRas, distances inside a face count only its open (silhouette) edges, so coverage is 1 inside
the surface instead of dipping along every inner edge.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from headavatar.devices import installed
from headavatar.errors import PipelineError
from headavatar.render.indexing import gather


@dataclass
class RasterOutput:
    attributes: torch.Tensor  # (B, H, W, C) interpolated on the visible face, 0 where none
    alpha: torch.Tensor  # (B, H, W) soft coverage in [0, 1]
    face_index: torch.Tensor  # (B, H, W) visible face, -1 where none (no gradient)


class MeshRasterizer(ABC):
    name: str

    @abstractmethod
    def __call__(self, pixels: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor,
                 height: int, width: int) -> RasterOutput:
        """pixels (B, N, 2) x/y at pixel centres = integer coordinates; depth (B, N) > 0;
        faces (F, 3) long, counter-clockwise seen from outside; attributes (B, N, C)."""


def _edge_terms(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Barycentric weights of points p (..., 2) in triangles (a, b, c) (..., 2); the signed area."""
    v0, v1 = b - a, c - a
    v2 = p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    safe = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / safe
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / safe
    return 1 - w1 - w2, w1, w2, den


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab = b - a
    t = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
    closest = a + t.clamp(0, 1)[..., None] * ab
    return ((p - closest) ** 2).sum(-1).clamp_min(1e-12).sqrt()


def signed_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                    open_edges: torch.Tensor | None = None) -> torch.Tensor:
    """Distance from p to the triangle: positive outside; inside, minus the distance to the nearest
    OPEN edge (``open_edges`` (..., 3) for ab, bc, ca; default all). Edges shared with another drawn
    face are not open, so the soft coverage does not dip along the inner edges of a surface."""
    w0, w1, w2, _ = _edge_terms(p, a, b, c)
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    d = torch.stack([_segment_distance(p, a, b), _segment_distance(p, b, c), _segment_distance(p, c, a)], -1)
    outside = d.min(-1).values
    if open_edges is None:
        return torch.where(inside, -outside, outside)
    far = torch.full_like(d, 1e4)
    return torch.where(inside, -torch.where(open_edges, d, far).min(-1).values, outside)


def _open_edges(faces: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """(F, 3) for edges ab, bc, ca: True unless the edge is shared with another drawn face."""
    return _open_edges_batched(faces, drawn[None], int(faces.max()) + 1 if len(faces) else 1)[0]


class TorchRasterizer(MeshRasterizer):
    """Pure PyTorch; runs anywhere. ``sigma`` (pixels) sets how soft the silhouette edge is.

    Work is proportional to the pixels each face's bounding box (grown by the soft edge's reach)
    covers, not to pixels x faces: (face, pixel) pairs are enumerated per face, then reduced per
    pixel with scatter operations.
    """

    name = "torch"
    compile = False  # CUDA: shading the pairs under torch.compile (fused kernels, fewer launches); trainers set it

    def __init__(self, sigma: float = 0.5, cull_backfaces: bool = True):
        self.sigma, self.cull = sigma, cull_backfaces

    @property
    def reach(self) -> int:
        """Pixels beyond a face's edge that its soft silhouette still touches."""
        return math.ceil(3 * self.sigma)

    def _drawn(self, tri: torch.Tensor) -> torch.Tensor:
        """Which of the screen triangles (F, 3, 2) to draw: outward-wound closed meshes have negative
        screen area (y down) when seen from behind, and those are culled."""
        if not self.cull:
            return torch.ones(len(tri), dtype=torch.bool, device=tri.device)
        return _edge_terms(tri[:, 0], tri[:, 0], tri[:, 1], tri[:, 2])[3] > 0

    def _pairs_batched(self, pixels: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, height: int,
                       width: int) -> tuple[torch.Tensor, ...]:
        """(view, face, x, y) of every (face, pixel) pair of all views, and open edges (B, F, 3).

        One host synchronisation: the number of pairs (faces not drawn contribute none)."""
        b, n_faces = len(pixels), len(faces)
        with torch.no_grad():
            tri = pixels.detach()[:, faces]  # (B, F, 3, 2)
            drawn = (self._drawn(tri.reshape(-1, 3, 2))).reshape(b, n_faces)
            open_edges = _open_edges_batched(faces, drawn, pixels.shape[1])
            t = tri.reshape(-1, 3, 2)  # index: view * F + face
            reach = self.reach
            lo = (t.min(1).values.floor() - reach).long()
            hi = (t.max(1).values.ceil() + reach).long()
            lo[:, 0].clamp_(0, width - 1), lo[:, 1].clamp_(0, height - 1)
            hi[:, 0].clamp_(-1, width - 1), hi[:, 1].clamp_(-1, height - 1)
            span = (hi - lo + 1).clamp_min(0)
            counts = span[:, 0] * span[:, 1] * drawn.reshape(-1)
            total = int(counts.sum())
            vf = torch.repeat_interleave(torch.arange(len(t), device=pixels.device), counts, output_size=total)
            start = torch.cumsum(counts, 0) - counts
            local = torch.arange(total, device=pixels.device) - start[vf]
            x = lo[vf, 0] + local % span[vf, 0].clamp_min(1)
            y = lo[vf, 1] + local // span[vf, 0].clamp_min(1)
        return vf // n_faces, vf % n_faces, x, y, open_edges

    def __call__(self, pixels: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor,
                 height: int, width: int) -> RasterOutput:
        """All views in one pass: (view, face, pixel) triples indexed into flattened (B * H * W) images, so
        the number of kernel launches does not grow with the number of views."""
        b = len(pixels)
        pairs = self._pairs_batched(pixels, depth, faces, height, width)
        values, alpha, visible = _shader(self.compile and pixels.is_cuda)(pixels, depth, faces, attributes, *pairs,
                                                                          height, width, self.sigma)
        return RasterOutput(values.reshape(b, height, width, -1), alpha.reshape(b, height, width),
                            visible.reshape(b, height, width))


@functools.cache
def _shader(compiled: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``_shade``, or its ``torch.compile`` (the pair count varies from step to step: dynamic shapes)."""
    return torch.compile(_shade, dynamic=True) if compiled else _shade


def _shade(pixels: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor,
           view: torch.Tensor, face: torch.Tensor, x: torch.Tensor, y: torch.Tensor, open_edges: torch.Tensor,
           height: int, width: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attributes (B * H * W, C), soft coverage (B * H * W,) and visible face (B * H * W,) from the (view, face,
    x, y) pairs (P,) of ``TorchRasterizer._pairs_batched``; inputs as ``TorchRasterizer.__call__`` takes them."""
    b, n = pixels.shape[:2]
    n_pix = height * width
    pix_all, z_all = pixels.reshape(b * n, 2), depth.reshape(b * n)
    attr_all = attributes.reshape(b * n, -1)
    q = torch.stack([x, y], -1).to(pixels.dtype)
    pixel = view * n_pix + y * width + x
    f = faces[face] + (view * n)[:, None]  # vertex ids in the flattened (B * N) arrays
    a, bb, c = gather(pix_all, f[:, 0]), gather(pix_all, f[:, 1]), gather(pix_all, f[:, 2])
    with torch.no_grad():  # hard visibility: the nearest covering face per pixel
        w0, w1, w2, den = _edge_terms(q, a.detach(), bb.detach(), c.detach())
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (den.abs() > 1e-12)
        zd = z_all.detach()
        inv_z = torch.where(inside, w0 / zd[f[:, 0]] + w1 / zd[f[:, 1]] + w2 / zd[f[:, 2]], -1.0)
        best = torch.full((b * n_pix,), -1.0, dtype=pixels.dtype, device=pixels.device)
        best.scatter_reduce_(0, pixel, inv_z, "amax")
        winner = inside & (inv_z >= best[pixel]) & (inv_z > 0)
        visible = torch.full((b * n_pix,), -1, dtype=torch.long, device=pixels.device)
        visible.scatter_reduce_(0, pixel, torch.where(winner, face, -1), "amax")
    # Soft silhouette: log(1 - p) summed over every face within reach of the pixel.
    d = signed_distance(q, a, bb, c, open_edges[view, face])
    log_miss = torch.zeros(b * n_pix, dtype=pixels.dtype, device=pixels.device)
    log_miss = log_miss.index_add(0, pixel, -torch.nn.functional.softplus(-d / sigma))
    alpha = 1 - log_miss.exp()
    # Attributes on the visible face, perspective-correct, differentiable in the vertices.
    hit = visible >= 0
    idx = torch.arange(b * n_pix, device=pixels.device)
    local = idx % n_pix
    grid = torch.stack([local % width, local // width], -1).to(pixels.dtype)
    vf = faces[visible.clamp_min(0)] + ((idx // n_pix) * n)[:, None]
    w0, w1, w2, _ = _edge_terms(grid, gather(pix_all, vf[:, 0]), gather(pix_all, vf[:, 1]), gather(pix_all, vf[:, 2]))
    w = torch.stack([w0 / gather(z_all, vf[:, 0]), w1 / gather(z_all, vf[:, 1]), w2 / gather(z_all, vf[:, 2])], -1)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    values = (w[..., None] * gather(attr_all, vf)).sum(1) * hit[:, None]
    return values, alpha, visible


def _open_edges_batched(faces: torch.Tensor, drawn: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """(B, F, 3) for edges ab, bc, ca of each view: True unless shared with another face drawn in that view.

    faces (F, 3) index ``n_vertices`` vertices; drawn (B, F). Edges are grouped by sorting their keys
    (no ``unique``, whose output size would need a host synchronisation)."""
    edges = torch.stack([faces, faces.roll(-1, 1)], -1).sort(-1).values  # (F, 3, 2): ab, bc, ca
    key = (edges[..., 0] * n_vertices + edges[..., 1]).reshape(-1)  # (3F,)
    sorted_key, order = key.sort()
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    inverse = torch.empty_like(order).scatter_(0, order, torch.cumsum(first, 0) - 1)  # edge id of each face edge
    b, n_slots = drawn.shape[0], len(key)  # at most 3F distinct edges
    slot = (torch.arange(b, device=faces.device)[:, None] * n_slots + inverse[None]).reshape(-1)
    count = torch.zeros(b * n_slots, device=faces.device).index_add(0, slot, drawn.repeat_interleave(3, 1)
                                                                      .reshape(-1).float())
    return (count[slot] < 2).reshape(b, -1, 3)


class PyTorch3DRasterizer(TorchRasterizer):
    """pytorch3d (BSD) finds, per pixel, the ``faces_per_pixel`` nearest drawn faces within 3 sigma
    (coarse-to-fine binning in CUDA) instead of enumerating every face's grown bounding box. Faces
    beyond those at a pixel are dropped from its soft silhouette."""

    name = "pytorch3d"

    def __init__(self, sigma: float = 0.5, cull_backfaces: bool = True, faces_per_pixel: int = 32):
        super().__init__(sigma, cull_backfaces)
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
        from pytorch3d.structures import Meshes

        self._rasterize, self._meshes, self.k = rasterize_meshes, Meshes, faces_per_pixel

    @torch.no_grad()
    def _pairs_batched(self, pixels: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, height: int,
                       width: int) -> tuple[torch.Tensor, ...]:
        views, face_ids, xs, ys, opens = [], [], [], [], []
        for i, (pix, z) in enumerate(zip(pixels.detach(), depth.detach(), strict=True)):
            face, x, y, open_edges = self._pairs(pix, z, faces, height, width)
            views.append(torch.full_like(face, i))
            face_ids.append(face), xs.append(x), ys.append(y), opens.append(open_edges)
        return torch.cat(views), torch.cat(face_ids), torch.cat(xs), torch.cat(ys), torch.stack(opens)

    @torch.no_grad()
    def _pairs(self, pix: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, height: int,
               width: int) -> tuple[torch.Tensor, ...]:
        drawn = self._drawn(pix[faces])
        keep = torch.nonzero(drawn).squeeze(1)
        s = min(height, width)  # pytorch3d NDC: +x left, +y up, the short side spans [-1, 1]
        ndc = torch.stack([(width - 1 - 2 * pix[:, 0]) / s, (height - 1 - 2 * pix[:, 1]) / s, depth], -1)
        pix_to_face, _, _, _ = self._rasterize(
            self._meshes(verts=[ndc.float()], faces=[faces[keep]]), image_size=(height, width),
            blur_radius=(6 * self.sigma / s) ** 2, faces_per_pixel=self.k, max_faces_per_bin=max(len(keep), 1),
            perspective_correct=False, cull_backfaces=False)
        at = torch.nonzero(pix_to_face[0] >= 0)
        return keep[pix_to_face[0][at[:, 0], at[:, 1], at[:, 2]]], at[:, 1], at[:, 0], _open_edges(faces, drawn)


def build_mesh_rasterizer(name: str, sigma: float, cull_backfaces: bool = True) -> MeshRasterizer:
    if name == "torch":
        return TorchRasterizer(sigma, cull_backfaces)
    if name == "pytorch3d":
        if not installed("pytorch3d"):
            raise PipelineError("meshhead.rasterizer=pytorch3d: the Python package pytorch3d is not installed")
        return PyTorch3DRasterizer(sigma, cull_backfaces)
    raise ValueError(f"unknown mesh rasterizer {name!r}")

"""A regular tetrahedral grid and differentiable marching tetrahedra (DMTet's surface extraction).

Each cube of an n^3 grid is split into the 6 tetrahedra of Kuhn's triangulation (one per
ordering of the axes, all sharing the cube's main diagonal), which conforms across neighbouring
cubes. Surface vertices sit where the SDF crosses zero on a tet edge, linearly interpolated, so
they are differentiable in both the SDF values and the (deformed) grid positions.
"""

from __future__ import annotations

import functools
import itertools

import torch

from headavatar.render.indexing import gather

TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def cube_tet_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices (N, 3) of an n^3-cube grid over [-1, 1]^3 and its tetrahedra (T, 4)."""
    axis = torch.linspace(-1, 1, n + 1)
    pos = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.arange((n + 1) ** 3).reshape(n + 1, n + 1, n + 1)
    base = idx[:-1, :-1, :-1].reshape(-1)
    stride = torch.tensor([(n + 1) ** 2, n + 1, 1])
    tets = []
    for order in itertools.permutations(range(3)):
        corner, chain = torch.zeros(3, dtype=torch.long), [base]
        for axis_i in order:
            corner = corner.clone()
            corner[axis_i] = 1
            chain.append(base + (corner * stride).sum())
        tets.append(torch.stack(chain, -1))
    return pos, torch.cat(tets)


def _triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Per inside-vertex bitmask (16 codes): up to two triangles as local edge indices (-1 = none)."""
    edge_of = {tuple(e): i for i, e in enumerate(TET_EDGES.tolist())}
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            table[code, 0] = torch.tensor([edge_of[tuple(sorted((lone, o)))] for o in others])
            count[code] = 1
        elif len(inside) == 2:
            (i, j), (k, m) = inside, outside
            e = [edge_of[tuple(sorted(p))] for p in ((i, k), (i, m), (j, m), (j, k))]  # a cycle round the quad
            table[code, 0] = torch.tensor([e[0], e[1], e[2]])
            table[code, 1] = torch.tensor([e[0], e[2], e[3]])
            count[code] = 2
    return table, count


TRIANGLES, TRIANGLE_COUNT = _triangle_table()


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRIANGLES, TRIANGLE_COUNT and the corner bit weights on ``device``, copied once (a pageable copy
    to a GPU waits for its stream)."""
    return TRIANGLES.to(device), TRIANGLE_COUNT.to(device), 2 ** torch.arange(4, device=device)


def tet_edges(tets: torch.Tensor, n_vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's unique edges (E, 2), (a < b) in lexicographic order, and each tet's 6 edges as ids (T, 6).

    Fixed for a grid, so marching tetrahedra need not find the crossed edges with ``unique`` (a sort
    and a host synchronisation) in every step."""
    pairs = tets[:, TET_EDGES.to(tets.device)].sort(-1).values  # (T, 6, 2)
    key = pairs[..., 0] * n_vertices + pairs[..., 1]  # a < b: the key's order is the pairs' lexicographic order
    unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    return torch.stack([unique // n_vertices, unique % n_vertices], -1), inverse.reshape(-1, 6)


def compact(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices (size,) of the True entries of a 1-D ``mask`` that has ``size`` of them, ascending: what
    ``nonzero`` gives, without its host synchronisation (the caller knows ``size``)."""
    slot = torch.where(mask, torch.cumsum(mask, 0) - 1, size)  # False entries all go to a spare slot
    out = torch.empty(size + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(len(mask), device=mask.device))[:size]


def marching_tets(pos: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor,
                  edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Surface of {sdf < 0}: vertices (M, 3) and faces (K, 3), counter-clockwise seen from outside.

    pos (N, 3), sdf (N,), tets (T, 4); ``edges``: ``tet_edges(tets, N)``, computed here when not given.
    Vertices are in the order of their grid edges (lexicographic), faces those of every active tet's
    first triangle, then every second one. One host synchronisation (the three output sizes)."""
    device = pos.device
    grid_edges, edge_ids = edges if edges is not None else tet_edges(tets, len(pos))
    with torch.no_grad():
        inside = sdf < 0
        triangles, triangle_count, bits = _tables(device)
        code = (inside[tets].long() * bits).sum(-1)  # (T,)
        active = (code > 0) & (code < 15)
        crossing = inside[grid_edges[:, 0]] != inside[grid_edges[:, 1]]  # (E,)
        counts = triangle_count[code]  # (T,) 0 where inactive
        n_active, n_verts, n_faces = torch.stack([active.sum(), crossing.sum(), counts.sum()]).tolist()
        cross = compact(crossing, n_verts)  # (M,) the crossed edges
        edge_to_vertex = torch.cumsum(crossing, 0) - 1  # (E,) vertex of a crossed edge
        tet_a = compact(active, n_active)
        code_a, counts_a = code[tet_a], counts[tet_a]
    unique = grid_edges[cross]
    # Zero crossing on each crossed edge: differentiable in sdf and pos.
    sa, sb = gather(sdf, unique[:, 0]), gather(sdf, unique[:, 1])
    wa = sb / (sb - sa)
    verts = gather(pos, unique[:, 0]) * wa[:, None] + gather(pos, unique[:, 1]) * (1 - wa[:, None])

    with torch.no_grad():
        table = triangles[code_a]  # (Ta, 2, 3) local edges
        local_vertex = edge_to_vertex[edge_ids[tet_a]]  # (Ta, 6)
        second = compact(counts_a > 1, n_faces - n_active)
        faces = torch.cat([torch.gather(local_vertex, 1, table[:, 0]),
                           torch.gather(local_vertex[second], 1, table[second, 1])])
        owner = tet_a[torch.cat([torch.arange(n_active, device=device), second])]
        # Orient every face so its normal points from the inside vertices of its tet to the outside ones.
        tv = pos[tets[owner]].detach()
        ins = inside[tets[owner]].float()[..., None]
        outside_mean = (tv * (1 - ins)).sum(1) / (1 - ins).sum(1).clamp_min(1)
        direction = outside_mean - (tv * ins).sum(1) / ins.sum(1).clamp_min(1)
        v = verts.detach()
        normal = torch.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=-1)
        flip = (normal * direction).sum(-1) < 0
        faces = torch.where(flip[:, None], faces.flip(1).roll(1, 1), faces)  # (a, b, c) -> (a, c, b)
    return verts, faces

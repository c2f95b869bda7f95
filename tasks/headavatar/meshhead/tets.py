"""A regular tetrahedral grid and differentiable marching tetrahedra (DMTet's surface extraction).

Each cube of an n^3 grid is split into the 6 tetrahedra of Kuhn's triangulation (one per
ordering of the axes, all sharing the cube's main diagonal), which conforms across neighbouring
cubes. Surface vertices sit where the SDF crosses zero on a tet edge, linearly interpolated, so
they are differentiable in both the SDF values and the (deformed) grid positions.
"""

from __future__ import annotations

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


def marching_tets(pos: torch.Tensor, sdf: torch.Tensor, tets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Surface of {sdf < 0}: vertices (M, 3) and faces (K, 3), counter-clockwise seen from outside."""
    device = pos.device
    with torch.no_grad():
        inside = sdf < 0
        code_bits = inside[tets].long() * (2 ** torch.arange(4, device=device))
        code = code_bits.sum(-1)
        active = (code > 0) & (code < 15)
        tets_a, code_a = tets[active], code[active]
        edges = tets_a[:, TET_EDGES.to(device)]  # (Ta, 6, 2) global vertex pairs
        edges = edges.sort(-1).values
        crossing = inside[edges[..., 0]] != inside[edges[..., 1]]
        unique, inverse = torch.unique(edges[crossing], dim=0, return_inverse=True)
        edge_to_vertex = torch.full(edges.shape[:2], -1, dtype=torch.long, device=device)
        edge_to_vertex[crossing] = inverse
    # Zero crossing on each unique edge: differentiable in sdf and pos.
    sa, sb = gather(sdf, unique[:, 0]), gather(sdf, unique[:, 1])
    wa = sb / (sb - sa)
    verts = gather(pos, unique[:, 0]) * wa[:, None] + gather(pos, unique[:, 1]) * (1 - wa[:, None])

    with torch.no_grad():
        table, counts = TRIANGLES.to(device)[code_a], TRIANGLE_COUNT.to(device)[code_a]
        faces = []
        for slot in range(2):
            has = counts > slot
            local = table[has, slot]  # (Tn, 3) local edges
            faces.append(torch.gather(edge_to_vertex[has], 1, local))
        owner = torch.cat([torch.nonzero(counts > s).squeeze(1) for s in range(2)])
        faces = torch.cat(faces)
        # Orient every face so its normal points from the inside vertices of its tet to the outside ones.
        tv = pos[tets_a[owner]].detach()
        ins = inside[tets_a[owner]].float()[..., None]
        outside_mean = (tv * (1 - ins)).sum(1) / (1 - ins).sum(1).clamp_min(1)
        direction = outside_mean - (tv * ins).sum(1) / ins.sum(1).clamp_min(1)
        v = verts.detach()
        normal = torch.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=-1)
        flip = (normal * direction).sum(-1) < 0
        faces[flip] = faces[flip][:, [0, 2, 1]]
    return verts, faces

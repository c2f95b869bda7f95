"""A small synthetic morphable head model stored like BFM09 (``BFM09_model_info.mat``).

The real Basel Face Model may not be shipped, so tests and the demo use this stand-in with the
same keys (``meanshape``, ``idBase``, ``exBase``, ``meantex``, ``texBase``, ``tri``, ``keypoints``,
1-based indices, millimetres). The mesh is a closed, head-shaped deformed ellipsoid facing +z
(y up); identity and expression bases are smooth displacement fields, and the 68 keypoints sit
where the iBUG 68-point convention puts them, so landmark fitting can be scored against truth.
"""

from __future__ import annotations

import numpy as np

from headavatar.fitting.bfm import MorphableModel

N_LAT, N_LON = 72, 112
SEMI_AXES_MM = np.array([78.0, 108.0, 96.0])  # half width, half height, half depth


def _sphere_grid() -> tuple[np.ndarray, np.ndarray]:
    """(u, v) per vertex of a lat-long grid with two pole vertices, and its triangles."""
    lat = np.linspace(-np.pi / 2, np.pi / 2, N_LAT + 2)[1:-1]
    lon = np.linspace(-np.pi, np.pi, N_LON, endpoint=False)
    v, u = np.meshgrid(lat, lon, indexing="ij")
    uv = np.concatenate([np.stack([u.ravel(), v.ravel()], 1), [[0.0, -np.pi / 2], [0.0, np.pi / 2]]])
    south, north = N_LAT * N_LON, N_LAT * N_LON + 1
    idx = np.arange(N_LAT * N_LON).reshape(N_LAT, N_LON)
    nxt = np.roll(idx, -1, axis=1)
    a, b, c, d = idx[:-1], nxt[:-1], idx[1:], nxt[1:]
    # Counter-clockwise seen from outside (normals point outward).
    quads = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    caps = np.concatenate([
        np.stack([np.full(N_LON, south), idx[0], nxt[0]], -1),
        np.stack([np.full(N_LON, north), nxt[-1], idx[-1]], -1),
    ])
    return uv, np.concatenate([quads, caps]).astype(np.int64)


def _bump(u: np.ndarray, v: np.ndarray, u0: float, v0: float, su: float, sv: float) -> np.ndarray:
    du = np.angle(np.exp(1j * (u - u0)))  # wrap-safe difference
    return np.exp(-0.5 * ((du / su) ** 2 + ((v - v0) / sv) ** 2))


def _ellipsoid(uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v = uv[:, 0], uv[:, 1]
    direction = np.stack([np.cos(v) * np.sin(u), np.sin(v), np.cos(v) * np.cos(u)], 1)
    pts = direction * SEMI_AXES_MM
    normal = direction / SEMI_AXES_MM
    return pts, normal / np.linalg.norm(normal, axis=1, keepdims=True)


def landmark_uv() -> np.ndarray:
    """(68, 2) azimuth/elevation (radians) of the iBUG-68 points on the face (subject faces +z)."""
    d = np.deg2rad
    t = np.linspace(-1, 1, 17)
    jaw = np.stack([d(72) * t, d(-4) - d(52) * (1 - t**2) ** 0.7], 1)
    brow_r = np.stack([d(np.linspace(-44, -10, 5)), d(24 + 3 * np.sin(np.linspace(0, np.pi, 5)))], 1)
    brow_l = brow_r[::-1] * [-1, 1]
    bridge = np.stack([np.zeros(4), d(np.linspace(16, -7, 4))], 1)
    nose_base = np.stack([d(np.linspace(-11, 11, 5)), d(-13 - 2 * np.cos(np.linspace(-1.2, 1.2, 5)))], 1)

    def ring(cu: float, cv: float, ru: float, rv: float, n: int, start: float) -> np.ndarray:
        a = start + np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([d(cu - ru * np.cos(a)), d(cv + rv * np.sin(a))], 1)

    eye_r = ring(-24, 10, 8, 3, 6, 0.0)
    eye_l = ring(24, 10, 8, 3, 6, 0.0)
    mouth_out = ring(0, -31, 20, 7, 12, 0.0)
    mouth_in = ring(0, -31, 13, 2.5, 8, 0.0)
    return np.concatenate([jaw, brow_r, brow_l, bridge, nose_base, eye_r, eye_l, mouth_out, mouth_in])


def build_model() -> MorphableModel:
    uv, faces = _sphere_grid()
    u, v = uv[:, 0], uv[:, 1]
    base, normal = _ellipsoid(uv)
    front = np.clip(np.cos(u), 0, 1)
    # A head, not an egg: nose, brow ridge, flatter sides, narrower chin.
    shape = base.copy()
    shape += normal * (24 * _bump(u, v, 0, np.deg2rad(-4), 0.13, 0.20))[:, None]  # nose
    shape += normal * (6 * _bump(u, v, 0, np.deg2rad(22), 0.55, 0.07))[:, None]  # brow ridge
    shape[:, 0] *= 1 - 0.18 * np.clip(-np.sin(v), 0, 1) * front  # chin narrows
    shape += normal * (-4 * _bump(u, v, np.deg2rad(-24), np.deg2rad(10), 0.12, 0.06)
                       - 4 * _bump(u, v, np.deg2rad(24), np.deg2rad(10), 0.12, 0.06))[:, None]  # eye sockets

    n = len(shape)
    lower = np.clip((np.deg2rad(-22) - v) / np.deg2rad(40), 0, 1) * front
    id_fields = [
        base * [0.06, 0, 0],  # width
        base * [0, 0.06, 0],  # height
        base * [0, 0, 0.06],  # depth
        normal * 8 * _bump(u, v, 0, np.deg2rad(-4), 0.13, 0.2)[:, None],  # nose size
        np.stack([0 * u, -8 * lower, 3 * lower], 1),  # chin length
        normal * 5 * (_bump(u, v, np.deg2rad(-45), np.deg2rad(-10), 0.3, 0.2)
                      + _bump(u, v, np.deg2rad(45), np.deg2rad(-10), 0.3, 0.2))[:, None],  # cheeks
    ]
    mouth = _bump(u, v, 0, np.deg2rad(-31), 0.35, 0.12)
    mouth_v = np.deg2rad(-31)
    corners = _bump(u, v, np.deg2rad(-20), mouth_v, 0.12, 0.1) - _bump(u, v, np.deg2rad(20), mouth_v, 0.12, 0.1)
    brows = _bump(u, v, 0, np.deg2rad(24), 0.7, 0.08)
    below_lip = np.clip((np.deg2rad(-31) - v) / np.deg2rad(8), 0, 1) * front
    exp_fields = [
        np.stack([0 * u, -14 * below_lip, -3 * below_lip], 1),  # jaw open
        np.stack([-6 * corners, 5 * np.abs(corners), -2 * np.abs(corners)], 1),  # smile
        np.stack([0 * u, 6 * brows, 0 * u], 1),  # brow raise
        np.stack([-0.15 * shape[:, 0] * mouth, 0 * u, 6 * mouth], 1),  # pucker
        normal * 6 * (_bump(u, v, np.deg2rad(-40), np.deg2rad(-20), 0.25, 0.15)
                      + _bump(u, v, np.deg2rad(40), np.deg2rad(-20), 0.25, 0.15))[:, None],  # cheek puff
    ]
    id_base = np.stack([f.reshape(-1) for f in id_fields], 1)
    exp_base = np.stack([f.reshape(-1) for f in exp_fields], 1)

    targets = landmark_uv()
    dist = np.abs(np.angle(np.exp(1j * (u[None] - targets[:, :1])))) + np.abs(v[None] - targets[:, 1:])
    keypoints = dist.argmin(1)
    assert len(set(keypoints.tolist())) == 68 and n > 68
    return MorphableModel(shape, id_base, exp_base, faces, keypoints, uv)

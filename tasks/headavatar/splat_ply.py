"""Gaussians as the INRIA 3D Gaussian Splatting ``.ply`` that splat viewers and tools read.

The layout the reference 3DGS code writes (and SuperSplat, splat-transform, GaussianSplats3D, gsplat.js
read): one binary little-endian ``vertex`` element with float32 properties ``x y z`` (position),
``nx ny nz`` (unused normals, zero), ``f_dc_0..2`` (degree-0 spherical-harmonic colour: RGB = 0.5 +
SH_C0 * f_dc), ``opacity`` (a logit), ``scale_0..2`` (log of the axis scales) and ``rot_0..3`` (a
quaternion, w first). No ``f_rest_*``: the avatar's colour does not depend on the view direction.

Written and read with NumPy alone (the format is a text header and one packed array), so the export adds no
dependency; the tests check it with ``plyfile``, an independent reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from headavatar.render.gaussian_raster import Splats

SH_C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))
PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
VERTEX = np.dtype([(name, "<f4") for name in PROPERTIES])
OPACITY_EPS = 1e-6  # opacities 0 and 1 have no finite logit


def to_ply_bytes(splats: Splats) -> bytes:
    """``splats`` (N Gaussians; ``colors``' first three channels are RGB in [0, 1]) as a 3DGS ``.ply``."""
    n = len(splats.means)
    v = np.zeros(n, VERTEX)
    cols = {
        ("x", "y", "z"): splats.means,
        ("f_dc_0", "f_dc_1", "f_dc_2"): (splats.colors[:, :3] - 0.5) / SH_C0,
        ("scale_0", "scale_1", "scale_2"): torch.log(splats.scales),
        ("rot_0", "rot_1", "rot_2", "rot_3"): torch.nn.functional.normalize(splats.quats, dim=-1),
        ("opacity",): torch.logit(splats.opacities.clamp(OPACITY_EPS, 1 - OPACITY_EPS))[:, None],
    }
    for names, values in cols.items():
        arr = values.detach().float().cpu().numpy()
        for i, name in enumerate(names):
            v[name] = arr[:, i]
    header = "\n".join(["ply", "format binary_little_endian 1.0", "comment headavatar avatar (3DGS layout)",
                        f"element vertex {n}", *(f"property float {p}" for p in PROPERTIES), "end_header"]) + "\n"
    return header.encode("ascii") + v.tobytes()


def read_ply(path: Path) -> Splats:
    """A ``.ply`` of this layout back as Splats (colours: the RGB the viewers show, 0.5 + SH_C0 * f_dc)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    props = [line.split()[2] for line in header if line.startswith("property float")]
    if props != list(PROPERTIES) or "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: not a 3DGS .ply of this layout (properties {props})")
    v = np.frombuffer(data, VERTEX, count, end)

    def cols(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([v[n] for n in names], -1).astype(np.float32))

    return Splats(cols("x", "y", "z"), cols("rot_0", "rot_1", "rot_2", "rot_3"),
                  torch.exp(cols("scale_0", "scale_1", "scale_2")), torch.sigmoid(cols("opacity"))[:, 0],
                  SH_C0 * cols("f_dc_0", "f_dc_1", "f_dc_2") + 0.5)

"""A small exact-visibility renderer for the synthetic capture (numpy + OpenCV, CPU).

Visibility comes from a triangle-id buffer drawn far-to-near with back-face culling; every covered
pixel then gets perspective-correct barycentrics, from which texture coordinates and normals are
interpolated and a procedural skin/hair/eyes/lips texture is shaded. The alpha matte is the
id-buffer coverage itself, so the ground truth is exact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

SUBPIXEL_BITS = 4
PIXEL_CHUNK = 1 << 16  # covered pixels shaded at a time


@dataclass(frozen=True)
class Camera:
    intrinsic: np.ndarray  # (3, 3)
    world_to_cam: np.ndarray  # (4, 4)
    width: int
    height: int

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (x right, y down, pixel centres at integers) and depth."""
        cam = points @ self.world_to_cam[:3, :3].T + self.world_to_cam[:3, 3]
        z = cam[:, 2]
        pix = cam @ self.intrinsic.T
        return pix[:, :2] / z[:, None], z


ATLAS_W, ATLAS_H = 2048, 1024


TEXTURES = ("procedural", "astronaut")
# dlib's 68 points (iBUG order, pixels x, y) on scikit-image's astronaut portrait (512 x 512), found once
# with the project's DlibDetector (upsample 1); fixed here so making a capture needs no detector.
ASTRONAUT_LANDMARKS = np.array([
    [179, 104], [180, 116], [181, 127], [182, 139], [185, 150], [191, 160], [200, 168], [209, 176], [220, 178],
    [232, 177], [243, 171], [253, 163], [260, 154], [265, 143], [268, 131], [270, 120], [272, 108], [186, 94],
    [192, 88], [200, 87], [208, 89], [216, 92], [236, 93], [244, 91], [252, 91], [260, 92], [265, 99], [226, 102],
    [225, 111], [225, 119], [225, 127], [214, 131], [219, 133], [224, 134], [229, 133], [234, 132], [195, 101],
    [200, 98], [207, 98], [212, 104], [206, 104], [199, 104], [237, 106], [243, 100], [250, 100], [255, 105],
    [250, 107], [244, 107], [201, 139], [209, 139], [218, 139], [224, 141], [230, 140], [238, 140], [246, 141],
    [238, 151], [229, 155], [222, 156], [216, 155], [208, 150], [204, 141], [218, 143], [223, 144], [230, 143],
    [243, 142], [229, 150], [223, 151], [217, 150]], np.float64)


@functools.cache
def texture_atlas(name: str = "procedural") -> np.ndarray:
    """A texture baked once into an equirectangular (azimuth x elevation) atlas (ATLAS_H, ATLAS_W, 3) BGR uint8.

    ``procedural``: skin, hair, eyes, brows and lips drawn from formulas (the default). ``astronaut``: the
    same, with the face of scikit-image's astronaut portrait (a real photograph) warped over the front so
    that its 68 landmarks land on the head's landmark positions, for detectors trained on real faces."""
    if name not in TEXTURES:
        raise ValueError(f"texture must be one of {', '.join(TEXTURES)}, got {name!r}")
    v, u = np.meshgrid(np.linspace(np.pi / 2, -np.pi / 2, ATLAS_H), np.linspace(-np.pi, np.pi, ATLAS_W), indexing="ij")
    rgb = texture(u.ravel(), v.ravel()).reshape(ATLAS_H, ATLAS_W, 3)
    atlas = (rgb[..., ::-1] * 255 + 0.5).astype(np.uint8)  # BGR
    return _photo_face(atlas) if name == "astronaut" else atlas


def _atlas_xy(uv: np.ndarray) -> np.ndarray:
    """Atlas pixel coordinates (x, y) of azimuth/elevation (radians) (..., 2)."""
    return np.stack([(uv[..., 0] + np.pi) / (2 * np.pi) * (ATLAS_W - 1),
                     (np.pi / 2 - uv[..., 1]) / np.pi * (ATLAS_H - 1)], -1)


def _photo_face(atlas: np.ndarray) -> np.ndarray:
    """``atlas`` with the astronaut's face warped piecewise-affinely onto the landmark positions, feathered in."""
    from skimage import data
    from skimage.transform import PiecewiseAffineTransform, SimilarityTransform, warp

    from headavatar.synthetic.morphable import landmark_uv

    photo = data.astronaut()[..., ::-1]  # RGB -> BGR
    dst = _atlas_xy(landmark_uv())  # (68, 2) where the photo's landmarks must land
    sim = _estimate(SimilarityTransform, dst, ASTRONAUT_LANDMARKS)  # atlas -> photo, for the ring
    centre = dst.mean(0)
    a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    half = (dst.max(0) - dst.min(0)) / 2
    ring = centre + np.stack([np.cos(a), np.sin(a)], 1) * half * [1.25, 1.45] + [0, -0.35 * half[1]]  # + forehead
    src_pts = np.concatenate([dst, ring])
    tform = _estimate(PiecewiseAffineTransform, src_pts, np.concatenate([ASTRONAUT_LANDMARKS, sim(ring)]))
    lo = np.floor(ring.min(0)).astype(int)
    hi = np.ceil(ring.max(0)).astype(int)
    crop = warp(photo, lambda xy: tform(xy + lo), output_shape=(hi[1] - lo[1], hi[0] - lo[0]), order=1,
                preserve_range=True)
    mask = np.zeros(crop.shape[:2], np.float32)
    cv2.fillPoly(mask, [np.round((ring - lo) * 4).astype(np.int32)], 1.0, shift=2)
    mask = cv2.erode(mask, np.ones((15, 15), np.uint8))
    mask = cv2.GaussianBlur(mask, (0, 0), 6)[..., None]
    out = atlas.copy()
    region = out[lo[1]:hi[1], lo[0]:hi[0]].astype(np.float32)
    out[lo[1]:hi[1], lo[0]:hi[0]] = np.clip(region * (1 - mask) + crop * mask + 0.5, 0, 255).astype(np.uint8)
    return out


def _estimate(kind: type, src: np.ndarray, dst: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A scikit-image transform of ``kind`` fitted src -> dst (``from_estimate`` where the version has it)."""
    if hasattr(kind, "from_estimate"):
        return kind.from_estimate(src, dst)
    t = kind()
    t.estimate(src, dst)
    return t


def texture(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for azimuth ``u`` / elevation ``v`` (radians): a face with features."""
    d = np.deg2rad

    def blob(u0: float, v0: float, su: float, sv: float) -> np.ndarray:
        du = np.angle(np.exp(1j * (u - d(u0))))
        return ((du / d(su)) ** 2 + ((v - d(v0)) / d(sv)) ** 2) < 1.0

    skin = np.stack([0.86, 0.66, 0.55])[None] * (0.92 + 0.08 * np.sin(9 * u)[:, None] * np.cos(7 * v)[:, None])
    # Fine freckle-like detail so multi-view correspondence has something to hold on to.
    skin = skin * (1 - 0.07 * ((np.sin(57 * u) * np.sin(61 * v)) > 0.6))[:, None]
    rgb = skin
    hair = (v > d(38) - d(10) * np.cos(u)) | (np.cos(u) < -0.25) | ((np.abs(np.sin(u)) > 0.9) & (v > d(5)))
    hair_rgb = np.stack([0.23, 0.15, 0.09])[None] * (0.8 + 0.2 * np.sin(40 * u + 8 * v))[:, None]
    rgb = np.where(hair[:, None], hair_rgb, rgb)
    brows = blob(-27, 25, 17, 3) | blob(27, 25, 17, 3)
    rgb = np.where(brows[:, None], [0.18, 0.12, 0.08], rgb)
    eye_white = blob(-24, 10, 8, 3) | blob(24, 10, 8, 3)
    iris = blob(-24, 10, 3, 3) | blob(24, 10, 3, 3)
    rgb = np.where(eye_white[:, None], [0.93, 0.93, 0.9], rgb)
    rgb = np.where(iris[:, None], [0.2, 0.3, 0.45], rgb)
    lips = blob(0, -31, 20, 7)
    mouth_gap = blob(0, -31, 13, 1.6)
    rgb = np.where(lips[:, None], [0.72, 0.3, 0.32], rgb)
    rgb = np.where(mouth_gap[:, None], [0.25, 0.05, 0.07], rgb)
    return rgb


@dataclass
class Rendering:
    image: np.ndarray  # (H, W, 3) uint8 BGR
    alpha: np.ndarray  # (H, W) uint8, 255 where the head covers the pixel


def render(
    vertices: np.ndarray,
    faces: np.ndarray,
    uv: np.ndarray,
    camera: Camera,
    background: np.ndarray,
    light_dir: np.ndarray,
    texture: str = "procedural",
) -> Rendering:
    """The head over ``background`` through ``camera``, and its exact coverage matte.

    Only the box around the visible triangles is rasterised, and its covered pixels are shaded in chunks
    of ``PIXEL_CHUNK`` (their temporaries stay in cache); every value is computed by the same float32
    operations as pixel by pixel over the whole image, so the output is the same to the bit
    (tests/test_synthetic_render.py checks it against the whole-image version)."""
    h, w = camera.height, camera.width
    pix, z = camera.project(vertices)
    tri_pix = pix[faces]  # (F, 3, 2)
    e1, e2 = tri_pix[:, 1] - tri_pix[:, 0], tri_pix[:, 2] - tri_pix[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # Outward-facing triangles keep their winding on screen: positive area with y pointing down.
    visible = (area > 0) & (z[faces].min(1) > 1e-6)
    lo, hi = tri_pix.min(1), tri_pix.max(1)
    visible &= (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] < w) & (lo[:, 1] < h)
    order = np.nonzero(visible)[0]
    order = order[np.argsort(-z[faces[order]].mean(1), kind="stable")]

    image = background.copy()
    alpha = np.zeros((h, w), np.uint8)
    if not len(order):
        return Rendering(image, alpha)
    # The id buffer covers the visible triangles' box (2 px of margin, clipped to the image). A box edge
    # inside the image has no triangle beyond it, and a shift by whole pixels moves OpenCV's fixed-point
    # fill by whole pixels, so each pixel gets the id it gets in a whole-image buffer.
    x0, y0 = (max(0, int(np.floor(v)) - 2) for v in lo[order].min(0))
    x1, y1 = min(w, int(np.ceil(hi[order, 0].max())) + 3), min(h, int(np.ceil(hi[order, 1].max())) + 3)
    ids = np.zeros((y1 - y0, x1 - x0), np.int32)
    pts = np.round(tri_pix[order] * (1 << SUBPIXEL_BITS)).astype(np.int32)
    pts -= np.array([x0, y0], np.int32) << SUBPIXEL_BITS
    for f, tri_pts in zip(order.tolist(), pts, strict=True):
        cv2.fillConvexPoly(ids, tri_pts, f + 1, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)

    ys, xs = np.nonzero(ids)
    fids = ids[ys, xs] - 1
    ys += y0
    xs += x0
    # Per triangle, what every pixel of it shares (the same float32 values the per-pixel formulas make).
    pix32 = pix.astype(np.float32)
    corner = pix32[faces]  # (F, 3, 2)
    v0_f, v1_f = corner[:, 1] - corner[:, 0], corner[:, 2] - corner[:, 0]
    den_f = v0_f[:, 0] * v1_f[:, 1] - v1_f[:, 0] * v0_f[:, 1]
    den_f = np.where(np.abs(den_f) < 1e-12, 1e-12, den_f).astype(np.float32)
    per_face = np.concatenate([corner[:, 0], v0_f, v1_f, den_f[:, None]], 1)  # (F, 7)
    z_f = z.astype(np.float32)[faces]  # (F, 3)
    # Per-vertex attributes: wrap-safe azimuth (cos, sin), elevation, Lambert shading.
    shade = 0.45 + 0.6 * np.clip(_vertex_normals(vertices, faces) @ light_dir, 0, 1)
    attrs = np.stack([np.cos(uv[:, 0]), np.sin(uv[:, 0]), uv[:, 1], shade], 1).astype(np.float32)
    attrs_f = attrs[faces]  # (F, 3, 4)
    atlas = texture_atlas(texture)
    for s in range(0, len(fids), PIXEL_CHUNK):
        fid, y, x = fids[s:s + PIXEL_CHUNK], ys[s:s + PIXEL_CHUNK], xs[s:s + PIXEL_CHUNK]
        g = per_face[fid]
        v0, v1, den = g[:, 2:4], g[:, 4:6], g[:, 6]
        v2 = np.stack([x, y], 1).astype(np.float32) - g[:, 0:2]
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        bary = np.clip(np.stack([1 - l1 - l2, l1, l2], 1), 0, 1)
        # Perspective-correct: interpolate attribute/z and 1/z in screen space.
        inv_z = bary / z_f[fid]
        bary = inv_z / inv_z.sum(1, keepdims=True)
        a = np.einsum("pk,pkc->pc", bary, attrs_f[fid])
        u = np.arctan2(a[:, 1], a[:, 0])
        atlas_x = (u + np.pi) / (2 * np.pi) * (ATLAS_W - 1)
        atlas_y = (np.pi / 2 - a[:, 2]) / np.pi * (ATLAS_H - 1)
        rgb = _sample_bilinear(atlas, atlas_x.astype(np.float32), atlas_y.astype(np.float32))
        image[y, x] = np.clip(rgb * a[:, 3:4], 0, 255).astype(np.uint8)
    alpha[ys, xs] = 255
    return Rendering(image, alpha)


def _sample_bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray, cols: int = 4096) -> np.ndarray:
    """``img`` at float positions, via cv2.remap (whose maps must be under 32767 wide)."""
    n = len(x)
    rows = -(-n // cols)
    pad = rows * cols - n
    mx = np.pad(x, (0, pad)).reshape(rows, cols)
    my = np.pad(y, (0, pad)).reshape(rows, cols)
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR).reshape(rows * cols, -1)[:n].astype(np.float32)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    fn = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    vn = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / (np.linalg.norm(vn, axis=1, keepdims=True) + 1e-12)

"""The synthetic capture's renderer and sensor noise, made faster, make the same images to the bit.

The renderer rasterises only the box around the visible triangles and shades its pixels in chunks; the
noise is drawn a band of rows at a time. Both are checked here against the whole-image versions they
replaced (kept below as the reference), so every capture the tests and benchmarks make is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from headavatar.synthetic import capture, render
from headavatar.synthetic.capture import LIGHT, SyntheticSpec, add_noise, background_plate, rig, sequence_truth
from headavatar.synthetic.morphable import build_model
from headavatar.synthetic.render import (
    ATLAS_H,
    ATLAS_W,
    SUBPIXEL_BITS,
    Camera,
    Rendering,
    _sample_bilinear,
    _vertex_normals,
    texture_atlas,
)


def reference_render(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, camera: Camera,
                     background: np.ndarray, light_dir: np.ndarray, texture: str = "procedural") -> Rendering:
    """The renderer as it was before it was made faster (commit 7d59d7b): the whole image at once."""
    h, w = camera.height, camera.width
    pix, z = camera.project(vertices)
    tri_pix = pix[faces]
    e1, e2 = tri_pix[:, 1] - tri_pix[:, 0], tri_pix[:, 2] - tri_pix[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    visible = (area > 0) & (z[faces].min(1) > 1e-6)
    lo, hi = tri_pix.min(1), tri_pix.max(1)
    visible &= (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] < w) & (lo[:, 1] < h)
    order = np.nonzero(visible)[0]
    order = order[np.argsort(-z[faces[order]].mean(1), kind="stable")]
    ids = np.zeros((h, w), np.int32)
    pts = np.round(tri_pix * (1 << SUBPIXEL_BITS)).astype(np.int32)
    for f in order:
        cv2.fillConvexPoly(ids, pts[f], int(f) + 1, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    ys, xs = np.nonzero(ids)
    fid = ids[ys, xs] - 1
    tri = faces[fid]
    pix32 = pix.astype(np.float32)
    p = np.stack([xs, ys], 1).astype(np.float32)
    a, b, c = pix32[tri[:, 0]], pix32[tri[:, 1]], pix32[tri[:, 2]]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    bary = np.clip(np.stack([1 - l1 - l2, l1, l2], 1), 0, 1)
    inv_z = bary / z[tri].astype(np.float32)
    bary = inv_z / inv_z.sum(1, keepdims=True)
    shade = 0.45 + 0.6 * np.clip(_vertex_normals(vertices, faces) @ light_dir, 0, 1)
    attrs = np.stack([np.cos(uv[:, 0]), np.sin(uv[:, 0]), uv[:, 1], shade], 1).astype(np.float32)
    a = np.einsum("pk,pkc->pc", bary, attrs[tri])
    u = np.arctan2(a[:, 1], a[:, 0])
    atlas_x = (u + np.pi) / (2 * np.pi) * (ATLAS_W - 1)
    atlas_y = (np.pi / 2 - a[:, 2]) / np.pi * (ATLAS_H - 1)
    rgb = _sample_bilinear(texture_atlas(texture), atlas_x.astype(np.float32), atlas_y.astype(np.float32))
    image = background.copy()
    image[ys, xs] = np.clip(rgb * a[:, 3:4], 0, 255).astype(np.uint8)
    alpha = np.zeros((h, w), np.uint8)
    alpha[ys, xs] = 255
    return Rendering(image, alpha)


def reference_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The sensor noise as it was: one whole-image draw."""
    if sigma <= 0:
        return image
    noise = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def scene(width: int, height: int, frames: int = 3, sequence: str = "EXP-2-eyes"):
    spec = SyntheticSpec("018", width=width, height=height, frames=frames)
    model = build_model()
    intr, extr = rig(spec)
    return spec, model, intr, extr, sequence_truth(spec, model, sequence, frames)


def assert_same(a: Rendering, b: Rendering) -> None:
    assert a.image.dtype == b.image.dtype and a.alpha.dtype == b.alpha.dtype
    assert np.array_equal(a.alpha, b.alpha), f"{int((a.alpha != b.alpha).sum())} matte pixels differ"
    assert np.array_equal(a.image, b.image), f"{int((a.image != b.image).any(-1).sum())} pixels differ"


@pytest.mark.parametrize("texture", ["procedural", "astronaut"])
def test_every_camera_renders_as_the_whole_image_version_did(texture: str) -> None:
    spec, model, intr, extr, truth = scene(256, 372)
    for cam in spec.cameras:
        camera = Camera(intr, extr[cam], spec.width, spec.height)
        plate = background_plate(cam, spec.width, spec.height)
        for f in range(len(truth["vertices"])):
            args = (truth["vertices"][f], model.faces, model.uv, camera, plate, LIGHT, texture)
            assert_same(render.render(*args), reference_render(*args))


def test_real_size_chunks_render_as_the_whole_image_version_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 2200x3208 the head covers ~1.3 million pixels: many chunks (made smaller here, so their edges fall
    everywhere), a box far inside the image."""
    monkeypatch.setattr(render, "PIXEL_CHUNK", 77_777)
    spec, model, intr, extr, truth = scene(2200, 3208, frames=1)
    cam = spec.cameras[3]
    camera = Camera(intr, extr[cam], spec.width, spec.height)
    args = (truth["vertices"][0], model.faces, model.uv, camera, background_plate(cam, 2200, 3208), LIGHT, "astronaut")
    new = render.render(*args)
    assert 0.1 < (new.alpha > 0).mean() < 0.3
    assert_same(new, reference_render(*args))


@pytest.mark.parametrize("shift", [(-150, 0), (130, 0), (0, -200), (0, 190), (-150, -200)])
def test_a_head_cut_by_the_image_edge_renders_as_before(shift: tuple[int, int]) -> None:
    """The principal point moved so that the head leaves the picture on one side or two: the rasterised box
    is clipped to the image there."""
    spec, model, intr, extr, truth = scene(256, 372, frames=2)
    moved = intr.copy()
    moved[:2, 2] += shift
    for cam in spec.cameras[::5]:
        camera = Camera(moved, extr[cam], spec.width, spec.height)
        plate = background_plate(cam, spec.width, spec.height)
        for f in range(2):
            args = (truth["vertices"][f], model.faces, model.uv, camera, plate, LIGHT, "procedural")
            new = render.render(*args)
            assert_same(new, reference_render(*args))
            assert new.alpha[:, 0].any() or new.alpha[:, -1].any() or new.alpha[0].any() or new.alpha[-1].any()


@pytest.mark.parametrize("away", ["behind", "beside"])
def test_a_camera_that_sees_no_head_gets_the_plate(away: str) -> None:
    """Nothing of the head in the picture: the plate and an empty matte (the whole-image version raised
    here, OpenCV's remap refusing an empty map; no capture has such a camera)."""
    spec, model, intr, extr, truth = scene(256, 372, frames=1)
    pose, k = extr[spec.cameras[0]].copy(), intr.copy()
    if away == "behind":
        pose[[0, 2]] = -pose[[0, 2]]  # turned round on its y axis: the head behind it
    else:
        k[0, 2] += 500  # the head projects right of the picture
    plate = background_plate(spec.cameras[0], 256, 372)
    out = render.render(truth["vertices"][0], model.faces, model.uv, Camera(k, pose, 256, 372), plate, LIGHT)
    assert np.array_equal(out.image, plate) and not out.alpha.any()


@pytest.mark.parametrize("shape", [(372, 256, 3), (3208, 2200, 3), (65, 7, 3), (64, 5, 3), (1, 4, 3), (130, 40)])
@pytest.mark.parametrize("sigma", [2.0, 0.3, 9.5, 0.0])
def test_noise_drawn_in_bands_is_the_whole_image_draw(shape: tuple[int, ...], sigma: float) -> None:
    """Band by band, the generator gives the draws of one whole-image call, so the noisy frames (and the
    generator's state after each, which the next frame of a camera's video draws from) are the same."""
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    image[:1] = 0  # clipped at both ends too
    image[-1:] = 255
    new, old = np.random.default_rng([1, 2]), np.random.default_rng([1, 2])
    for _ in range(2):
        assert np.array_equal(add_noise(image, sigma, new), reference_noise(image, sigma, old))
    assert new.bit_generator.state == old.bit_generator.state


def test_a_camera_video_is_made_from_the_same_frames(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One camera's video job end to end: the noisy frames it encodes and the mattes it writes, the new code
    against the reference renderer and noise swapped in."""
    spec = SyntheticSpec("018", width=128, height=186, frames=4)
    made = {}
    for name, (rend, noise) in {"new": (render.render, add_noise), "old": (reference_render, reference_noise)}.items():
        frames: list[np.ndarray] = []

        def noisy(image: np.ndarray, sigma: float, rng: np.random.Generator, noise=noise, frames=frames) -> np.ndarray:
            frames.append(noise(image, sigma, rng))
            return frames[-1]

        monkeypatch.setattr(capture, "render", rend)
        monkeypatch.setattr(capture, "add_noise", noisy)
        out = tmp_path / name
        job = capture._CameraJob(spec, "EXP-1-head", spec.cameras[2], 4, out / "v.mp4", out / "a")
        capture._render_camera_video(job)
        mattes = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((out / "a").rglob("*.png"))]
        made[name] = frames + mattes
    assert len(made["new"]) == 8
    for new, old in zip(made["new"], made["old"], strict=True):
        assert np.array_equal(new, old)


def test_noise_drawn_by_torch_has_the_numpy_noise_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The opt-in GPU noise (here on the CPU): the same distribution, clipping and truncation as numpy's,
    seeded per camera and sequence, a fresh draw every frame; where it fails the frames are noised by numpy."""
    image = np.random.default_rng(4).integers(20, 236, (512, 600, 3), dtype=np.uint8)
    spec = SyntheticSpec("018")
    monkeypatch.setenv(capture.NOISE_DEVICE_ENV, "cpu")
    draw = capture.noise_source(spec, spec.cameras[0], "EXP-1-head")
    first, second = draw(image, 2.0), draw(image, 2.0)
    ref = reference_noise(image, 2.0, np.random.default_rng(1)).astype(np.float64) - image
    assert ref.mean() == pytest.approx(-0.5, abs=0.02)  # truncation toward zero: half a level down
    for noisy in (first, second):
        d = noisy.astype(np.float64) - image
        assert d.mean() == pytest.approx(ref.mean(), abs=0.02) and d.std() == pytest.approx(ref.std(), abs=0.02)
    assert not np.array_equal(first, second)  # each frame draws anew
    again = capture.noise_source(spec, spec.cameras[0], "EXP-1-head")(image, 2.0)
    other = capture.noise_source(spec, spec.cameras[1], "EXP-1-head")(image, 2.0)
    assert np.array_equal(again, first) and not np.array_equal(other, first)
    edges = np.array([[[0, 255, 1]]], np.uint8).repeat(2000, 0)
    clipped = draw(edges, 9.0)
    assert clipped.dtype == np.uint8 and clipped[..., 0].max() > 0 and clipped[..., 1].min() < 255
    assert draw(image, 0.0) is image

    monkeypatch.setenv(capture.NOISE_DEVICE_ENV, "no-such-device")
    fallback = capture.noise_source(spec, spec.cameras[0], "EXP-1-head")
    assert np.array_equal(fallback(image, 2.0), reference_noise(image, 2.0, np.random.default_rng(
        [spec.seed, int(spec.cameras[0]), sum(map(ord, "EXP-1-head"))])))

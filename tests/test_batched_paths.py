"""The speed paths of stages 5-6 (issue 22) compute what the plain paths compute.

* The mesh rasteriser draws all views in one pass: each view must equal drawing it alone.
* Training views held as device tensors: the same batches as ``Views.tensors``.
* The separable SSIM: the 2-D Gaussian window's SSIM.
* What stage 6 compiles on CUDA traces as one graph with the eager values and gradients.
* The loop reads loss terms only at log steps: history still has every logged step as floats.
* Avatar videos: decodable H.264 with the frames asked for; the turntable orbit keeps the camera's distance.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headavatar.avatar_video import orbit, write_mp4
from headavatar.gaussianhead.metrics import image_scores
from headavatar.gaussianhead.model import GaussianHead, SuperResolution, pixel_shuffle
from headavatar.gaussianhead.perceptual import Perceptual, ssim
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.render.gaussian_raster import TorchGaussianRasterizer
from headavatar.render.mesh_raster import TorchRasterizer
from headavatar.settings import GaussianHeadConfig
from headavatar.training.device_data import DeviceViews
from headavatar.training.loop import _floats
from headavatar.training.views import Views


def _sphere(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    u, v = torch.meshgrid(torch.linspace(0.2, 2.9, n), torch.linspace(0, 2 * torch.pi, n + 1)[:-1], indexing="ij")
    pts = torch.stack([u.sin() * v.cos(), u.sin() * v.sin(), u.cos()], -1).reshape(-1, 3)
    faces = []
    for i in range(n - 1):
        for j in range(n):
            a, b, c, d = i * n + j, i * n + (j + 1) % n, (i + 1) * n + j, (i + 1) * n + (j + 1) % n
            faces += [[a, c, b], [b, c, d]]
    return pts.double(), torch.tensor(faces)


def test_mesh_rasterizer_draws_views_together_as_each_alone() -> None:
    pts, faces = _sphere()
    g = torch.Generator().manual_seed(1)
    views = []
    for _ in range(3):
        shift = torch.rand(3, generator=g, dtype=torch.float64) * 0.4 - 0.2
        cam = pts + shift + torch.tensor([0, 0, 4.0], dtype=torch.float64)
        pix = cam[:, :2] / cam[:, 2:] * 20 + 16
        views.append((pix, cam[:, 2]))
    pixels = torch.stack([p for p, _ in views]).requires_grad_()
    depth = torch.stack([z for _, z in views])
    attrs = torch.rand(3, len(pts), 4, generator=g, dtype=torch.float64)
    r = TorchRasterizer(0.5)
    together = r(pixels, depth, faces, attrs, 32, 32)
    (together.attributes.sum() + together.alpha.sum()).backward()
    grad_together = pixels.grad.clone()
    assert (together.face_index >= 0).any()
    for i in range(3):
        p = pixels.detach()[i : i + 1].clone().requires_grad_()
        alone = r(p, depth[i : i + 1], faces, attrs[i : i + 1], 32, 32)
        (alone.attributes.sum() + alone.alpha.sum()).backward()
        assert torch.equal(alone.face_index[0], together.face_index[i])
        torch.testing.assert_close(alone.alpha[0], together.alpha[i])
        torch.testing.assert_close(alone.attributes[0], together.attributes[i])
        torch.testing.assert_close(p.grad[0], grad_together[i])


def _views(frames: int, cams: int, size: int) -> Views:
    rng = np.random.default_rng(0)
    return Views([f"{f:04d}" for f in range(frames)], [str(c) for c in range(cams)],
                 rng.integers(0, 255, (frames, cams, size, size, 3), dtype=np.uint8),
                 rng.integers(0, 255, (frames, cams, size, size), dtype=np.uint8),
                 rng.integers(0, 255, (frames, cams, size, size), dtype=np.uint8),
                 rng.normal(size=(frames, cams, 3, 3)), rng.normal(size=(frames, cams, 3, 4)),
                 rng.normal(size=(frames, 6)), 1.5, rng.normal(size=(frames, 5)), rng.normal(size=(frames, 68, 3)))


def test_device_views_give_the_batches_views_give() -> None:
    v = _views(3, 4, 8)
    d = DeviceViews(v, torch.device("cpu"))
    frames, cams = torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0])
    got, want = d.batch(frames, cams), v.tensors(frames, cams, torch.device("cpu"))
    for k, t in want.items():
        assert torch.equal(got[k], t), k
    image, mask, visible = d.view(1, 2)
    one = v.tensors(torch.tensor([1]), torch.tensor([2]), torch.device("cpu"))
    assert torch.equal(image, one["image"][0]) and torch.equal(mask, one["mask"][0])
    assert torch.equal(visible, one["visible"][0])


@pytest.mark.slow
def test_what_stage_6_compiles_traces_as_one_graph_with_the_eager_values_and_gradients() -> None:
    """On CUDA the trainer hands ``GaussianHead._splats`` and ``view_losses`` to torch.compile. Traced here
    whole (``fullgraph``: a graph break would split the kernels again) with the eager backend, they
    give the eager numbers; Inductor's own arithmetic is checked on the GPU (docs/gpu.md)."""
    cfg = GaussianHeadConfig(coarse_size=16, fine_size=32, features=8, hidden=16, sr_channels=8, mouth_points=10)
    g = torch.Generator().manual_seed(0)
    head = GaussianHead(cfg, 5, 3, torch.rand(50, 3, generator=g), torch.rand(50, 4, generator=g),
                        torch.rand(68, 3, generator=g), torch.zeros(3), 1.0)
    for p in head.parameters():  # leave the zero start: every output then depends on every MLP
        p.data.add_(0.01 * torch.randn(p.shape, generator=g))
    fine = _views(3, 4, 32)
    coarse = Views(fine.folders, fine.cameras, fine.images[:, :, ::2, ::2], fine.masks[:, :, ::2, ::2],
                   fine.visible[:, :, ::2, ::2], fine.intrinsics, fine.extrinsics, fine.pose, fine.scale, fine.exp,
                   fine.landmarks_3d)
    t = GaussianHeadTrainer(head, SuperResolution(8, 8, 2), coarse, fine, cfg, TorchGaussianRasterizer(),
                            Perceptual(None), torch.device("cpu"))
    assert not t.compile and not head.compile  # CUDA only
    params = [p for p in [*head.parameters(), *t.sr.parameters()] if p.requires_grad]
    img = torch.rand(16, 16, 8, generator=g, requires_grad=True)
    cases = [(head._splats, (t.coarse.exp[1], t.coarse.pose[1] + head.delta_pose[1], t.coarse.scale)),
             (t.view_losses, (img, t.coarse.raw(1, 2), t.fine.raw(1, 2)))]
    for fn, args in cases:
        traced = torch.compile(fn, backend="aot_eager", fullgraph=True)
        outs = [f(*args) for f in (fn, traced)]
        grads = [torch.autograd.grad(sum(o.float().sum() for o in out), [*params, img], allow_unused=True)
                 for out in outs]
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b)
        for a, b in zip(*grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0])


def _ssim_2d(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(window, dtype=a.dtype) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    c = a.shape[1]
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, padding=window // 2, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + 1e-4) * (2 * cov + 9e-4)) / ((mu_a**2 + mu_b**2 + 1e-4) * (var_a + var_b + 9e-4))
    return s.flatten(1).mean(1)


def test_separable_ssim_is_the_2d_window_ssim_and_pixel_shuffle_keeps_layout() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 37, 45, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ssim(a, b), _ssim_2d(a.float(), b.float()).to(torch.float32), atol=1e-5, rtol=0)
    x = torch.randn(2, 12, 5, 7, generator=g)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = pixel_shuffle(xl, 2)
    assert torch.equal(y, F.pixel_shuffle(x, 2)) and y.is_contiguous(memory_format=torch.channels_last)
    up = torch.randn(y.shape, generator=g)  # NCHW, as an upstream gradient may come: the result is channels-last
    (grad,) = torch.autograd.grad(y, xl, up)
    assert torch.equal(grad, F.pixel_unshuffle(up, 2)) and grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("blur", ["conv", "shifts"])
def test_both_ssim_blurs_are_the_2d_window_ssim_with_the_same_gradient(blur: str, monkeypatch) -> None:
    """The compiled stage 6 blurs SSIM's moments as shifted sums, eager code as convolutions (``perceptual.BLUR``):
    both must be the textbook 2-D window SSIM, and train alike."""
    from headavatar.gaussianhead import perceptual

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 29, 41, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    grads = {}
    for way in ("conv", blur):
        monkeypatch.setattr(perceptual, "BLUR", way)
        x = a.clone().requires_grad_()
        value = ssim(x, b)
        torch.testing.assert_close(value, _ssim_2d(a, b), atol=1e-5, rtol=0)
        value.sum().backward()
        grads[way] = x.grad
    torch.testing.assert_close(grads[blur], grads["conv"], atol=1e-6, rtol=1e-4)


def test_protocol_scores_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 64, 64, generator=g)
    pred = (gt + 0.05 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    matte = torch.zeros(64, 64)
    matte[16:48, 16:48] = 1
    pred_outside_wrong = pred.clone()
    pred_outside_wrong[:, :8] = 1 - gt[:, :8]  # errors only outside the matte
    s = image_scores(pred, gt, matte)
    assert s["psnr"] == pytest.approx(float(-10 * torch.log10(((pred - gt) ** 2).mean())), abs=1e-4)
    inside = matte.bool()
    assert s["psnr_matte"] == pytest.approx(float(-10 * torch.log10(((pred - gt)[:, inside] ** 2).mean())), abs=1e-4)
    w = image_scores(pred_outside_wrong, gt, matte)
    assert w["psnr"] < s["psnr"] - 3 and w["psnr_matte"] == pytest.approx(s["psnr_matte"], abs=1e-6)
    assert 0 < s["ssim"] < 1 and 0 < s["ssim_matte"] < 1


def test_loss_terms_are_read_once_as_floats() -> None:
    out = _floats({"loss": torch.tensor(1.5), "a": torch.tensor([2.0]), "b": 3.0})
    assert out == {"loss": 1.5, "a": 2.0, "b": 3.0} and all(type(v) is float for v in out.values())


def test_videos_decode_with_the_frames_written(tmp_path: Path) -> None:
    frames = [np.full((33, 47, 3), 40 * i, np.uint8) for i in range(5)]
    info = write_mp4(frames, tmp_path / "v.mp4", fps=10)
    assert info["frames"] == 5 and (info["width"], info["height"]) == (46, 32)
    assert not (tmp_path / "v.part.mp4").exists()
    with av.open(str(tmp_path / "v.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 5
    assert [round(float(f.mean()) / 40) for f in decoded] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no frames"):
        write_mp4([], tmp_path / "empty.mp4")
    e = torch.tensor([[1.0, 0, 0, 0.1], [0, 1, 0, 0.2], [0, 0, 1, 3.0]])
    center = torch.tensor([0.05, -0.1, 0.2])
    for angle in (0.0, 1.0, 2 * torch.pi):
        o = orbit(e, center, angle)
        assert float(torch.linalg.norm(o[:, :3] @ center + o[:, 3])) == pytest.approx(
            float(torch.linalg.norm(e[:, :3] @ center + e[:, 3])), abs=1e-5)  # same distance to the head
    torch.testing.assert_close(orbit(e, center, 2 * torch.pi), e, atol=1e-5, rtol=0)
    assert not torch.allclose(orbit(e, center, 1.0), e, atol=1e-3)

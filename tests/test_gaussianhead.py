"""Stage 6: the Gaussian rasteriser, rotations, LPIPS loading, and training with resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from conftest import UPSTREAM_MESHHEAD, assert_gradients_match_finite_differences, cli, copy_stages
from headavatar.contract.stage import read_manifest
from headavatar.errors import ConfigError, PipelineError
from headavatar.gaussianhead import perceptual
from headavatar.gaussianhead.model import SuperResolution, matrix_to_quat
from headavatar.gaussianhead.perceptual import LPIPSVGG, psnr, ssim
from headavatar.layout import stage_prefix
from headavatar.render.gaussian_raster import (
    Splats,
    TorchGaussianRasterizer,
    build_gaussian_rasterizer,
    exact_knn_scale,
    knn_scale,
    projection_matrix,
    quat_to_matrix,
)
from headavatar.storage import ObjectStore
from test_meshhead import _wait_for


def _scene(dtype: torch.dtype = torch.float64) -> tuple[Splats, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 6
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

    splats = Splats((rand(n, 3) - 0.5) * 0.4, torch.randn(n, 4, generator=g, dtype=dtype), rand(n, 3) * 0.05 + 0.03,
                    rand(n) * 0.5 + 0.3, rand(n, 4))
    view = torch.eye(4, dtype=dtype)
    view[2, 3] = 2.0
    k = torch.tensor([[40.0, 0, 15.5], [0, 40.0, 15.5], [0, 0, 1]], dtype=dtype)
    return splats, view, k


def test_gaussian_rasterizer_gradients_match_finite_differences() -> None:
    splats, view, k = _scene()
    raster = TorchGaussianRasterizer()
    w = torch.rand(32, 32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wa = torch.rand(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(*tensors: torch.Tensor) -> torch.Tensor:
        img, alpha = raster(Splats(*tensors), view, k, 32, 32)
        return (img * w).sum() + (alpha * wa).sum()

    fields = ("means", "quats", "scales", "opacities", "colors")
    assert_gradients_match_finite_differences(loss, [getattr(splats, f) for f in fields])


def test_one_gaussian_composites_as_3dgs_defines_it() -> None:
    one = Splats(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.05), torch.tensor([0.8]),
                 torch.ones(1, 2))
    view = torch.eye(4)
    view[2, 3] = 2.0
    k = torch.tensor([[40.0, 0, 16.0], [0, 40.0, 16.0], [0, 0, 1]])
    img, alpha = TorchGaussianRasterizer()(one, view, k, 33, 33)
    var = (40 * 0.05 / 2) ** 2 + 0.3  # projected variance + the 0.3 px^2 low-pass
    assert abs(alpha[16, 16].item() - 0.8) < 1e-6 and abs(img[16, 16, 1].item() - 0.8) < 1e-6
    assert abs(alpha[16, 18].item() - 0.8 * np.exp(-0.5 * 4 / var)) < 1e-6
    # Two splats on one ray: the front one hides the back one by its transmittance.
    two = Splats(torch.tensor([[0, 0, 0.0], [0, 0, 0.5]]), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.05),
                 torch.tensor([0.6, 0.9]), torch.tensor([[1.0, 0], [0, 1.0]]))
    img, alpha = TorchGaussianRasterizer()(two, view, k, 33, 33)
    assert abs(img[16, 16, 0].item() - 0.6) < 1e-5 and abs(img[16, 16, 1].item() - 0.4 * 0.9) < 1e-5
    assert abs(alpha[16, 16].item() - (1 - 0.4 * 0.1)) < 1e-5


def test_rotation_and_knn_helpers_match_their_definitions() -> None:
    q = torch.nn.functional.normalize(torch.randn(500, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    back = matrix_to_quat(quat_to_matrix(q))
    assert torch.allclose(back * torch.sign((back * q).sum(-1, keepdim=True)), q, atol=1e-5)
    pts = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    d = np.linalg.norm(pts.numpy()[:, None] - pts.numpy()[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = np.sqrt((np.sort(d, 1)[:, :3] ** 2).mean(1))
    np.testing.assert_allclose(exact_knn_scale(pts, chunk=64).numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(knn_scale(pts).numpy(), expected, rtol=1e-4)


def test_projection_matrix_puts_points_where_the_intrinsics_do() -> None:
    """The 3DGS-style backends (dgr) go through clip space and ndc2Pix; the matrix must land every
    point on the OpenCV pixel fx x/z + cx, also with an off-centre principal point."""
    k = torch.tensor([[610.0, 0, 231.7], [0, 655.0, 301.2], [0, 0, 1]])
    width, height = 512, 640
    view = torch.eye(4)
    view[:3, :3] = quat_to_matrix(torch.tensor([0.9, 0.1, -0.2, 0.3]))
    view[:3, 3] = torch.tensor([0.05, -0.02, 1.2])
    pts = (torch.rand(100, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.3
    clip = torch.cat([pts, torch.ones(100, 1)], 1) @ (projection_matrix(k, width, height) @ view).T
    ndc = clip[:, :3] / clip[:, 3:]
    pixels = torch.stack([((ndc[:, 0] + 1) * width - 1) / 2, ((ndc[:, 1] + 1) * height - 1) / 2], -1)
    cam = pts @ view[:3, :3].T + view[:3, 3]
    expected = cam[:, :2] / cam[:, 2:] * torch.stack([k[0, 0], k[1, 1]]) + torch.stack([k[0, 2], k[1, 2]])
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
    assert ((ndc[:, 2] > 0) & (ndc[:, 2] < 1)).all()  # depth inside the [near, far] range


def test_rasterizer_choice_is_explicit_about_what_is_missing() -> None:
    cpu = torch.device("cpu")
    assert build_gaussian_rasterizer("auto", cpu).name == "torch"
    for name in ("gsplat", "dgr"):
        with pytest.raises(PipelineError, match=f"rasterizer={name} needs a CUDA device"):
            build_gaussian_rasterizer(name, cpu)


def test_super_resolution_and_metrics() -> None:
    sr = SuperResolution(32, 8, 4)
    x = torch.rand(2, 32, 16, 16)
    out = sr(x)
    assert out.shape == (2, 3, 64, 64)
    # Starts as the bilinear upsampling of the RGB channels (the residual's last layer is zero).
    base = torch.nn.functional.interpolate(x[:, :3], scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(out, base)
    with pytest.raises(ValueError):
        SuperResolution(32, 8, 3)
    a = torch.rand(1, 3, 32, 32)
    assert psnr(a, a).item() > 90 and abs(ssim(a, a).item() - 1) < 1e-6
    assert abs(psnr(a, (a + 0.1).clamp(0, 1)).item() - 20) < 1.5


@pytest.mark.parametrize("blur", ["conv", "shifts"])
def test_ssim_explicit_gradient_is_autograds(blur: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSIM's written-out backward equals autograd through the blur (float64, random images, either blur,
    a gradient for one input or both) and passes gradcheck; through ``ssim`` in float32 the two agree too."""
    monkeypatch.setattr(perceptual, "BLUR", blur)
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 19, 23, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 19, 23, generator=g, dtype=torch.float64)
    up = torch.rand(2, generator=g, dtype=torch.float64)
    for need_b in (False, True):
        b.requires_grad_(need_b)
        ours = perceptual._SSIM.apply(a, b, 11, 1.5)
        ref = perceptual._ssim_terms(perceptual._blur(torch.cat([a, b, a * a, b * b, a * b], 1), 11, 1.5),
                                     3)[0].flatten(1).mean(1)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-14)
        got = torch.autograd.grad(ours, [a, b] if need_b else [a], up)
        want = torch.autograd.grad(ref, [a, b] if need_b else [a], up)
        for x, y in zip(got, want, strict=True):
            assert (x - y).norm() / y.norm() < 1e-12
    small = (a[:1, :, :7, :9].detach().requires_grad_(), b[:1, :, :7, :9].detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: perceptual._SSIM.apply(x, y, 5, 1.5), small)
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float()
    monkeypatch.setattr(perceptual, "GRAD", "explicit")
    explicit = torch.autograd.grad(ssim(a32, b32).sum(), a32)[0]
    monkeypatch.setattr(perceptual, "GRAD", "autograd")
    reference = torch.autograd.grad(ssim(a32, b32).sum(), a32)[0]
    assert (explicit - reference).norm() / reference.norm() < 1e-5


def test_lpips_weights_load_strictly(tmp_path: Path) -> None:
    net = LPIPSVGG()
    state = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    state.update({f"lin{i}.model.1.weight": torch.rand_like(net.lins[i].weight) for i in range(5)})
    torch.save(state, tmp_path / "lpips_vgg.pth")
    loaded = LPIPSVGG().load(tmp_path / "lpips_vgg.pth", "lpips_vgg.pth")
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded(a, a), torch.zeros(2)) and (loaded(a, b) > 0).all()
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lin4"):
        LPIPSVGG().load(tmp_path / "partial.pth", "partial.pth")


@pytest.mark.s3
@pytest.mark.slow
def test_training_resumes_after_sigkill_and_exports_a_better_avatar(store: ObjectStore, demo_upstream: str,
                                                                    s3_env: dict[str, str],
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    copy_stages(store, demo_upstream, ("extract", "sample", "matting", "fitting", "meshhead"))
    prefix = store.key(stage_prefix("018", "gaussianhead"))
    args = ["run", "gaussianhead", "--capture", "018", "--profile", "demo", "--set", UPSTREAM_MESHHEAD]
    proc = subprocess.Popen([sys.executable, "-m", "headavatar.cli", *args], env={**os.environ, **s3_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(store, f"{prefix}/_state/checkpoint.pt", proc, timeout=300)  # step 100 of 200
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert read_manifest(store, "018", "gaussianhead") is None

    # The retry runs with other execution settings (issue 34.1): it resumes all the same.
    retry = ["--set", "gaussianhead.compile=false", "--set", "gaussianhead.device=cpu",
             "--set", "gaussianhead.precision=fp32", "--set", "gaussianhead.checkpoint_every=50"]
    r = cli(*args, *retry, env=s3_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from the checkpoint at step 100" in r.stderr
    m = read_manifest(store, "018", "gaussianhead")
    # Another evaluation interval is a cache hit; another learning rate is not.
    r = cli(*args, "--set", "gaussianhead.eval_every=7", env=s3_env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["cached"] is True, r.stderr[-2000:]
    r = cli("status", "--capture", "018", "--profile", "demo", "--set", UPSTREAM_MESHHEAD,
            "--set", "gaussianhead.lr_net=0.0002", env=s3_env)
    assert "gaussianhead  stale: config gaussianhead.lr_net (made" in r.stdout, r.stdout
    history = json.loads(store.get_bytes(f"{prefix}/history.json"))
    assert [h["step"] for h in history["losses"]] == list(range(10, 201, 10))
    evals = history["holdout"]
    assert [e["step"] for e in evals] == [0, 100, 200]
    assert evals[-1]["holdout_psnr"] > evals[0]["holdout_psnr"] + 3, evals
    assert evals[-1]["holdout_ssim"] > evals[0]["holdout_ssim"], evals
    assert m.metrics["resumed_from_step"] == 100 and m.metrics["holdout_psnr"] == evals[-1]["holdout_psnr"]
    avatar = json.loads(store.get_bytes(f"{prefix}/avatar/avatar.json"))
    assert avatar["gaussians"] == m.metrics["gaussians"] > 300 and avatar["fine_size"] == 64
    assert "avatar/avatar.pt" in m.files
    sheet = cv2.imdecode(np.frombuffer(store.get_bytes(f"{prefix}/renders/0000.jpg"), np.uint8), 1)
    # 2 held-out cameras x (GT | render | difference x4), 64 px each, enlarged x3 to reach 384 px.
    assert sheet.shape == (3 * 2 * 64, 3 * 3 * 64, 3)
    gt, render, diff = (sheet[::3, ::3][:, i * 64:(i + 1) * 64].astype(float) for i in range(3))
    expected = np.clip(np.abs(gt - render) * 4, 0, 255)  # from the JPEG's own panels: its error, x4
    assert np.abs(diff - expected).mean() < 12, np.abs(diff - expected).mean()
    assert diff.mean() > 1  # a trained avatar is close, not identical
    # The named evaluation protocol and the avatar videos (issue 22).
    assert avatar["eval_protocol"] == "headavatar-eval/1"
    assert {"novel_view_psnr_matte", "novel_view_ssim_matte"} <= set(m.metrics)
    assert m.metrics["novel_view_psnr"] == m.metrics["holdout_psnr"]
    frames = {}
    for name in ("reenactment", "turntable"):
        assert f"videos/{name}.mp4" in m.files
        path = tmp_path_factory.mktemp("videos") / f"{name}.mp4"
        path.write_bytes(store.get_bytes(f"{prefix}/videos/{name}.mp4"))
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            frames[name] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames["turntable"]) == 72 and frames["turntable"][0].shape == (64, 64, 3)
    assert frames["reenactment"][0].shape == (64, 128, 3)  # GT | avatar
    assert len(frames["reenactment"]) == len(avatar["frames"])  # no held-out sequence: the training frames
    # `headavatar render` rebuilds the same avatar from the bucket and renders the same videos.
    out = tmp_path_factory.mktemp("render")
    r = cli("render", "--capture", "018", "--profile", "demo", "--set", UPSTREAM_MESHHEAD, "--out", str(out),
            env=s3_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["turntable"]["frames"] == 72 and info["reenactment"]["frames"] == len(avatar["frames"])
    with av.open(str(out / "turntable.mp4")) as c:
        first = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - frames["turntable"][0]).mean() < 0.5

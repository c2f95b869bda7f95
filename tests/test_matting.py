"""Stage 3: the weights-free matte against ground truth; the BMV2 network's contract."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import cli, prepare_sampled, tiny_config
from headavatar.contract.stage import read_manifest, run_stage
from headavatar.errors import ConfigError
from headavatar.imaging import CropResize
from headavatar.layout import GROUND_TRUTH, stage_prefix
from headavatar.matting.bmv2 import MattingRefine, load_weights
from headavatar.stages import build_stages
from headavatar.storage import ObjectStore


def written_coverage(store: ObjectStore, files: dict) -> float:
    """Mean alpha of the full-size mattes the stage wrote, checked to be a sizeable share of each image,
    so that a coverage off by a factor (halved, or over the wrong images) cannot pass for it."""
    prefix = store.key(stage_prefix("018", "matting"))
    masks = [cv2.imdecode(np.frombuffer(store.get_bytes(f"{prefix}/{f}"), np.uint8), 0)
             for f in sorted(files) if "/mask_" in f and "lowres" not in f]
    assert len(masks) == 7 * 16 and all(mk.shape == (256, 256) for mk in masks)
    coverage = float(np.mean([mk.mean() / 255 for mk in masks]))
    assert 0.1 < coverage < 0.9, coverage
    return coverage


@pytest.mark.s3
@pytest.mark.slow
def test_classical_matte_matches_ground_truth(store: ObjectStore, tiny_capture: Path) -> None:
    prepare_sampled(store, tiny_capture)
    cfg = tiny_config("matting.method=classical")
    res = run_stage(build_stages()["matting"], "018", cfg, store)
    m = res.manifest
    frames = sorted({f.split("/")[1] for f in m.files if f.startswith("images/")})
    assert len(frames) == 7 and len([f for f in m.files if "/mask_" in f and "lowres" not in f]) == 7 * 16
    assert m.metrics["iou_mean"] >= 0.95 and m.metrics["iou_min"] >= 0.9, m.metrics
    assert m.metrics["mean_alpha_coverage"] == pytest.approx(written_coverage(store, m.files), rel=0.02), m.metrics
    assert "ground_truth_alpha" in m.inputs and "overlays/0000.jpg" in m.files

    # Score one matte independently of the stage's own metric.
    prefix = store.key(stage_prefix("018", "matting"))
    mask = cv2.imdecode(np.frombuffer(store.get_bytes(f"{prefix}/images/0002/mask_222200044.jpg"), np.uint8), 0)
    low = cv2.imdecode(np.frombuffer(store.get_bytes(f"{prefix}/images/0002/mask_lowres_222200044.jpg"), np.uint8), 0)
    assert mask.shape == (256, 256) and low.shape == (64, 64)
    # Folder 0002 is extracted frame 2 of the first sequence: video frame 6.
    gt = cv2.imread(str(tiny_capture / GROUND_TRUTH / "018/EXP-1-head/alpha/0006/cam_222200044.png"), 0)
    gt = CropResize.from_config(cfg.extract).apply(gt)
    p, g = mask > 127, gt > 127
    assert (p & g).sum() / (p | g).sum() >= 0.95
    assert run_stage(build_stages()["matting"], "018", cfg, store).cached


@pytest.mark.s3
@pytest.mark.slow
def test_missing_or_wrong_weights_fail_before_any_frame(store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str],
                                               tmp_path: Path) -> None:
    prepare_sampled(store, tiny_capture)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint" * 100)
    for weights, message in ((str(tmp_path / "nope.pth"), "nope.pth does not exist"),
                             (str(junk), "junk.pth are not a PyTorch checkpoint"),
                             ("s3://headavatar-test/none.pth", "none.pth does not exist"),
                             (None, "needs matting.weights")):
        args = ["run", "matting", "--capture", "018", "--profile", "demo", "--set", "matting.method=bmv2"]
        if weights:
            args += ["--set", f"matting.weights={weights}"]
        r = cli(*args, env=s3_env)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
    assert read_manifest(store, "018", "matting") is None
    assert not any("/mask_" in o.key for o in store.list(store.key(stage_prefix("018", "matting"))))


def test_network_forward_on_cpu_with_random_weights() -> None:
    torch.manual_seed(0)
    model = MattingRefine("resnet101", backbone_scale=0.25, refine_mode="sampling", refine_sample_pixels=256).eval()
    src, bgr = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        pha, fgr = model(src, bgr)
    assert pha.shape == (2, 1, 64, 96) and fgr.shape == (2, 3, 64, 96)
    assert pha.min() >= 0 and pha.max() <= 1 and torch.isfinite(fgr).all()
    for mode in ("thresholding", "full"):
        model.refiner.mode = mode
        with torch.inference_mode():
            assert model(src, bgr)[0].shape == (2, 1, 64, 96)


def test_checkpoint_layout_and_strict_roundtrip(tmp_path: Path) -> None:
    model = MattingRefine("resnet101")
    state = model.state_dict()
    # The published checkpoint's layout (torchvision ResNet/ASPP names, 6-channel stem, 37 outputs).
    expected = {
        "backbone.conv1.weight": (64, 6, 7, 7), "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.0.downsample.0.weight": (2048, 1024, 1, 1), "aspp.convs.0.0.weight": (256, 2048, 1, 1),
        "aspp.convs.3.0.weight": (256, 2048, 3, 3), "aspp.convs.4.1.weight": (256, 2048, 1, 1),
        "aspp.project.0.weight": (256, 1280, 1, 1), "decoder.conv1.weight": (128, 768, 3, 3),
        "decoder.conv4.weight": (37, 54, 3, 3), "decoder.conv4.bias": (37,), "refiner.conv1.weight": (24, 42, 3, 3),
        "refiner.conv4.bias": (4,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("backbone.fc", "backbone.avgpool")) for k in state)
    assert model.backbone.layer4[1].conv2.dilation == (2, 2) and model.backbone.layer4[0].conv2.stride == (1, 1)

    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    fresh = load_weights(MattingRefine("resnet101"), path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())

    torch.save(MattingRefine("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ConfigError, match="do not match MattingRefine"):
        load_weights(MattingRefine("resnet101"), tmp_path / "r50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        load_weights(MattingRefine("resnet101"), tmp_path / "junk.pth")


@pytest.mark.s3
@pytest.mark.slow
def test_network_method_runs_the_stage_with_weights_from_s3(store: ObjectStore, tiny_capture: Path,
                                                             tmp_path: Path) -> None:
    prepare_sampled(store, tiny_capture)
    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    net = MattingRefine("resnet50")
    with torch.no_grad():  # random weights matte ~0.5 % of an image; biased, ~40 %: a wrong coverage shows
        net.decoder.conv4.bias[0] = net.refiner.conv4.bias[0] = 0.5
    torch.save(net.state_dict(), path)
    store.upload_file(path, store.key("weights/r50.pth"))
    cfg = tiny_config("matting.method=bmv2", "matting.backbone=resnet50", "matting.refine_sample_pixels=4096",
                      f"matting.weights=s3://{store.bucket}/{store.key('weights/r50.pth')}")
    m = run_stage(build_stages()["matting"], "018", cfg, store).manifest
    assert len([f for f in m.files if "/mask_" in f]) == 2 * 7 * 16
    assert m.config["matting"]["method"] == "bmv2"
    # The reported coverage is that of the mattes written (JPEG rounding aside), not just any number in [0, 1].
    assert m.metrics["mean_alpha_coverage"] == pytest.approx(written_coverage(store, m.files), rel=0.02), m.metrics

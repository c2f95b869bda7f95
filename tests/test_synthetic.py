"""The synthetic capture: NeRSemble layout, real H.264 videos, geometrically consistent truth."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from headavatar.fitting.bfm import MorphableModel
from headavatar.layout import GROUND_TRUTH, RAW
from headavatar.settings import NERSEMBLE_CAMERAS
from headavatar.synthetic.morphable import build_model
from headavatar.synthetic.render import Camera


def test_raw_layout_matches_nersemble(tiny_capture: Path) -> None:
    raw = tiny_capture / RAW
    params = json.loads((raw / "camera_params/018/camera_params.json").read_text())
    assert sorted(params["world_2_cam"]) == sorted(NERSEMBLE_CAMERAS)
    assert np.array(params["intrinsics"]).shape == (3, 3)
    for cam in NERSEMBLE_CAMERAS:
        m = np.array(params["world_2_cam"][cam])
        assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
        np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
        bg = cv2.imread(str(raw / f"sequence_BACKGROUND_part-1/018/BACKGROUND/image_{cam}.jpg"))
        assert bg.shape == (372, 256, 3)
        for seq in ("EXP-1-head", "EXP-2-eyes"):
            with av.open(str(raw / f"sequence_{seq}_part-1/018/{seq}/cam_{cam}.mp4")) as c:
                s = c.streams.video[0]
                assert s.codec_context.name == "h264"
                assert (s.codec_context.width, s.codec_context.height) == (256, 372)
                assert sum(1 for _ in c.decode(s)) == 20


def test_ground_truth_is_consistent_across_cameras(tiny_capture: Path) -> None:
    truth = tiny_capture / GROUND_TRUTH / "018"
    model = MorphableModel.load_mat(truth / "morphable_model.mat")
    assert len(model.keypoints) == 68 and model.faces.min() == 0
    params = np.load(truth / "EXP-1-head/params.npz")
    assert params["landmarks_3d"].shape == (20, 68, 3) and params["exp_coeff"].shape == (20, model.exp_base.shape[1])
    assert params["rotation"].shape == (20, 3) and params["translation"].shape == (20, 3)
    cams = np.load(truth / "cameras.npz")
    raw = tiny_capture / RAW
    frame = 6
    # Every camera has its truth: a silhouette for the frame and a pose (a camera left out fails here).
    alphas = sorted(p.stem.removeprefix("cam_") for p in (truth / f"EXP-1-head/alpha/{frame:04d}").glob("cam_*.png"))
    assert alphas == sorted(NERSEMBLE_CAMERAS)
    assert sorted(k.removeprefix("world_2_cam_") for k in cams.files if k.startswith("world_2_cam_")) == alphas
    misses = []
    for cam in alphas:
        camera = Camera(cams["intrinsic"], cams[f"world_2_cam_{cam}"], 256, 372)
        alpha = cv2.imread(str(truth / f"EXP-1-head/alpha/{frame:04d}/cam_{cam}.png"), cv2.IMREAD_GRAYSCALE)
        assert 0.05 < (alpha > 0).mean() < 0.6
        # The nose tip (landmark 30) projects inside the head silhouette in every camera.
        px, _ = camera.project(params["landmarks_3d"][frame][30:31])
        x, y = np.round(px[0]).astype(int)
        if not (0 <= x < 256 and 0 <= y < 372 and alpha[y, x] == 255):
            misses.append(cam)
        # Where the truth says background, the video shows the background plate.
        cap = cv2.VideoCapture(str(raw / f"sequence_EXP-1-head_part-1/018/EXP-1-head/cam_{cam}.mp4"))
        for _ in range(frame + 1):
            ok, img = cap.read()
        assert ok
        bg = cv2.imread(str(raw / f"sequence_BACKGROUND_part-1/018/BACKGROUND/image_{cam}.jpg"))
        outside = cv2.erode((alpha == 0).astype(np.uint8), np.ones((5, 5))) > 0
        inside = cv2.erode((alpha > 0).astype(np.uint8), np.ones((5, 5))) > 0
        diff = np.abs(img.astype(int) - bg.astype(int)).sum(-1)
        assert np.median(diff[outside]) < 12 and np.median(diff[inside]) > 30
    assert misses == [], f"the nose tip is outside the silhouette in cameras {misses}"


def test_head_moves_and_changes_expression(tiny_capture: Path) -> None:
    params = np.load(tiny_capture / GROUND_TRUTH / "018/EXP-1-head/params.npz")
    assert np.ptp(params["rotation"], axis=0).max() > np.deg2rad(1)
    assert np.ptp(params["exp_coeff"], axis=0).min() > 0.05
    lm = params["landmarks_3d"]
    assert np.linalg.norm(lm[-1] - lm[0], axis=-1).mean() > 1e-3  # metres


def test_model_keypoints_follow_the_68_point_layout() -> None:
    m = build_model()
    v = m.meanshape[m.keypoints]
    assert v[8, 1] < v[30, 1] < v[27, 1]  # chin below nose tip below nose bridge (y up)
    assert v[0, 0] < v[16, 0] and v[36, 0] < v[45, 0]  # subject's right is -x
    assert v[30, 2] == pytest.approx(v[:, 2].max())  # the nose tip is the most forward point
    assert m.exp_base.shape[1] >= 5 and m.id_base.shape[1] >= 5


def test_v2_layout_is_a_participant_folder_whose_colours_the_calibration_restores(tiny_capture: Path,
                                                                                 tiny_capture_v2: Path) -> None:
    """Same scene and noise as the v1 capture, recorded through the inverse of each camera's matrix."""
    from headavatar.color import ColorCorrection

    v1, v2 = tiny_capture / RAW, tiny_capture_v2 / RAW / "v2" / "018"
    calibration = sorted(p.relative_to(v2).as_posix() for p in v2.rglob("*.json"))
    assert calibration == ["calibration/camera_params.json", "calibration/color_calibration.json"]
    assert len(list(v2.glob("sequences/*/images/cam_*.mp4"))) == 2 * 16
    assert len(list(v2.glob("sequences/BACKGROUND/image_*.jpg"))) == 16
    matrices = json.loads((v2 / "calibration/color_calibration.json").read_text())
    assert sorted(matrices) == sorted(NERSEMBLE_CAMERAS)
    for cam in NERSEMBLE_CAMERAS[:4]:
        m = np.array(matrices[cam])
        assert m.shape == (3, 3) and not np.allclose(m, np.eye(3), atol=0.02)
        truth = cv2.imread(str(v1 / f"sequence_BACKGROUND_part-1/018/BACKGROUND/image_{cam}.jpg")).astype(float)
        recorded = cv2.imread(str(v2 / f"sequences/BACKGROUND/image_{cam}.jpg"))
        corrected = ColorCorrection(m)(recorded).astype(float)
        before, after = np.abs(recorded - truth).mean(), np.abs(corrected - truth).mean()
        assert after < 1.5 and before > 3 * after, (cam, before, after)
        with av.open(str(v2 / f"sequences/EXP-1-head/images/cam_{cam}.mp4")) as c:
            frame = next(c.decode(c.streams.video[0])).to_ndarray(format="bgr24")
        with av.open(str(v1 / f"sequence_EXP-1-head_part-1/018/EXP-1-head/cam_{cam}.mp4")) as c:
            frame_v1 = next(c.decode(c.streams.video[0])).to_ndarray(format="bgr24").astype(float)
        assert np.abs(ColorCorrection(m)(frame).astype(float) - frame_v1).mean() < 2.0

"""Stages 1 + 2 against the reference procedure, file for file, on a real synthetic capture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY, tiny_config, upload_capture
from headavatar.bench.reference import dataset_color_correction, pad_crop, reference_extract, reference_sample
from headavatar.contract.stage import read_manifest, run_stage
from headavatar.errors import RawCaptureError
from headavatar.imaging import CropResize
from headavatar.layout import RAW, stage_prefix
from headavatar.settings import ExtractConfig, StorageConfig
from headavatar.stages import build_stages
from headavatar.stages.extract import worker_pool
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, rig, write_capture

pytestmark = pytest.mark.s3
STRIDES = ("extract.frame_stride=3", "sample.frame_stride=10")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def download_stage(store: ObjectStore, capture: str, stage: str, dest: Path) -> Path:
    prefix = store.key(stage_prefix(capture, stage))
    pairs = [(o.key, dest / o.key[len(prefix) + 1:]) for o in store.list(prefix)]
    store.download_many(pairs)
    return dest


def run_both(store: ObjectStore, capture: str, *overrides: str) -> None:
    cfg = tiny_config(*STRIDES, *overrides)
    stages = build_stages()
    run_stage(stages["extract"], capture, cfg, store)
    run_stage(stages["sample"], capture, cfg, store)


@pytest.mark.parametrize("layout", ["v1", "v2"])
@pytest.mark.slow
def test_outputs_equal_reference_file_for_file(layout: str, store: ObjectStore, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    """v2: the reference colour-corrects each whole frame with colour-science first (the dataset's procedure)."""
    capture = request.getfixturevalue("tiny_capture" if layout == "v1" else "tiny_capture_v2")
    upload_capture(store, capture)
    run_both(store, "018")
    ours = download_stage(store, "018", "sample", tmp_path / "ours")
    cfg = tiny_config(*STRIDES)
    correct = dataset_color_correction(capture / RAW, "018") if layout == "v2" else None
    ref = reference_sample(reference_extract(capture / RAW, "018", tmp_path / "ref1", cfg, correct),
                           tmp_path / "ref2", cfg)

    def listing(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    ours_files = listing(ours) - {"manifest.json", "frames.json"}
    assert ours_files == listing(ref)
    assert {p.split("/")[1] for p in ours_files if p.startswith("images/")} == {"0000", "0010"}
    assert len(ours_files) == 16 + 2 * 16 * 5
    worst = min(psnr(cv2.imread(str(ours / f)), cv2.imread(str(ref / f))) for f in ours_files if f.endswith(".jpg"))
    assert worst >= 45, f"worst PSNR {worst:.1f} dB"
    for f in (f for f in ours_files if f.endswith(".npz")):
        a, b = np.load(ours / f), np.load(ref / f)
        assert a["extrinsic"].dtype == np.float64 and a["extrinsic"].shape == (3, 4)
        np.testing.assert_allclose(a["extrinsic"], b["extrinsic"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(a["intrinsic"], b["intrinsic"], rtol=0, atol=1e-9)
    img = cv2.imread(str(ours / "images/0010/image_222200040.jpg"))
    assert img.shape == (256, 256, 3)
    assert cv2.imread(str(ours / "images/0010/image_lowres_222200040.jpg")).shape == (64, 64, 3)
    # Frame 0010 is the 4th extracted frame of the second (sorted) sequence: video frame 9.
    index = json.loads((ours / "frames.json").read_text())
    assert index["frames"][1] == {"folder": "0010", "sequence": "EXP-2-eyes_part-1", "video_frame": 9}
    extract = read_manifest(store, "018", "extract")
    assert extract.metrics["raw_layout_version"] == int(layout[1])
    assert extract.metrics["color_corrected"] == (layout == "v2")


def test_stage1_writes_only_what_stage2_keeps(store: ObjectStore, tiny_capture: Path) -> None:
    upload_capture(store, tiny_capture)
    cfg = tiny_config(*STRIDES)
    res = run_stage(build_stages()["extract"], "018", cfg, store)
    folders = {f.split("/")[1] for f in res.manifest.files if f.startswith("images/")}
    assert folders == {"0000", "0010"}
    assert res.manifest.metrics["extracted_frames"] == 14
    assert res.manifest.metrics["video_frames_decoded"] <= 16 * 40  # each video decoded at most once
    again = run_stage(build_stages()["extract"], "018", cfg, store)
    assert again.cached


@pytest.mark.parametrize("left,top,size", [(-10, 5, 140), (10, 20, 50), (-30, -40, 200), (90, 5, 40),
                                           (500, 500, 64)])
def test_crop_pads_with_black_exactly_as_the_reference(left: int, top: int, size: int) -> None:
    """Wider than the source but inside it vertically (the NeRSemble case), inside, overlapping
    every edge, crossing one edge, and missing the source entirely."""
    image = np.random.default_rng(0).integers(1, 256, (150, 120, 3), dtype=np.uint8)
    ours = CropResize(left, top, size, size, size).crop(image)
    assert np.array_equal(ours, pad_crop(image, left, top, size))


def test_visible_masks_mark_padding() -> None:
    crop = CropResize.from_config(ExtractConfig())
    vis3 = crop.visible(3208, 2200)
    white = np.full((3208, 2200, 3), 255, np.uint8)
    assert np.array_equal(vis3, cv2.resize(pad_crop(white, -200, 304, 2600), (2048, 2048)))  # as the reference
    vis = vis3[..., 0]
    # The crop starts 200 px left of the source: the first ~157 output columns are padding.
    assert vis[1024, :150].max() == 0 and vis[1024, 170:1800].min() == 255
    assert vis.shape == (2048, 2048)


def test_intrinsics_project_a_point_to_the_same_image_content() -> None:
    spec = SyntheticSpec("018")
    intr, extr = rig(spec)
    crop = CropResize.from_config(ExtractConfig())
    k_out = crop.intrinsic(intr)
    rng = np.random.default_rng(0)
    points = rng.normal(0, 0.06, (20, 3))
    for cam in spec.cameras[:4]:
        rt = extr[cam]
        cam_pts = points @ rt[:3, :3].T + rt[:3, 3]
        src = cam_pts @ intr.T
        src = src[:, :2] / src[:, 2:]
        out = cam_pts @ k_out.T
        out = out[:, :2] / out[:, 2:]
        expected = (src - [crop.left, crop.top]) * (crop.out_size / crop.size)
        np.testing.assert_allclose(out, expected, atol=1e-9)
        # Image content: a bright dot drawn at the source projection lands at the projected pixel.
        for p_src, p_out in zip(src[:3], out[:3], strict=True):
            img = np.zeros((spec.height, spec.width, 3), np.uint8)
            cv2.circle(img, (round(p_src[0] * 16), round(p_src[1] * 16)), 6 * 16, (255, 255, 255), -1, cv2.LINE_AA, 4)
            res = crop.apply(img)[..., 0].astype(np.float64)
            ys, xs = np.nonzero(res)
            w = res[ys, xs]
            centroid = np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()
            # 0.5*(1 - scale) px is the reference's corner-vs-centre resize convention.
            assert np.abs(centroid - p_out).max() < 0.35


def _synth(root: Path, capture: str, **kw) -> Path:
    args = {"frames": 4, "sequences": ("EXP-1-head",), **TINY, **kw}
    write_capture(SyntheticSpec(capture, **args), root / RAW, workers=2)
    return root


@pytest.mark.slow
def test_shorter_video_truncates_its_sequence(store: ObjectStore, tmp_path: Path) -> None:
    root = _synth(tmp_path, "101", frames=20, sequences=("EXP-1-head", "EXP-2-eyes"),
                  frame_lengths={"EXP-1-head/222200037": 14})
    upload_capture(store, root)
    run_both(store, "101")
    index = json.loads(store.get_bytes(store.key(stage_prefix("101", "extract"), "frames.json")))
    assert [s["video_frames"] for s in index["sequences"]] == [14, 20]
    assert index["total_extracted"] == 5 + 7
    sample = json.loads(store.get_bytes(store.key(stage_prefix("101", "sample"), "frames.json")))
    assert sample["frames"][1] == {"folder": "0010", "sequence": "EXP-2-eyes_part-1", "video_frame": 15}


def test_one_frame_video_gives_one_frame(store: ObjectStore, tmp_path: Path) -> None:
    upload_capture(store, _synth(tmp_path, "102", frames=1))
    run_both(store, "102")
    index = json.loads(store.get_bytes(store.key(stage_prefix("102", "sample"), "frames.json")))
    assert [f["folder"] for f in index["frames"]] == ["0000"]
    assert store.exists(store.key(stage_prefix("102", "sample"), "images/0000/image_222200049.jpg"))


def test_camera_missing_from_a_sequence_is_an_error(store: ObjectStore, tmp_path: Path) -> None:
    root = _synth(tmp_path, "103", sequences=("EXP-1-head", "EXP-2-eyes"), frame_lengths={"EXP-2-eyes/222200040": 0})
    upload_capture(store, root)
    with pytest.raises(RawCaptureError, match=r"sequence_EXP-2-eyes_part-1 of capture 103 has no video for camera\(s\) "
                                              r"222200040"):
        run_both(store, "103")


def test_videos_of_different_resolutions_are_an_error(store: ObjectStore, tmp_path: Path) -> None:
    root = _synth(tmp_path / "a", "104")
    other = _synth(tmp_path / "b", "104", width=200, height=292)
    cam = "sequence_EXP-1-head_part-1/104/EXP-1-head/cam_222200041.mp4"
    shutil.copy(other / RAW / cam, root / RAW / cam)
    upload_capture(store, root)
    odd = r"capture 104: videos differ in resolution: s3://.*/cam_222200041\.mp4 is 200x292 \(the others are 256x372\)"
    with pytest.raises(RawCaptureError, match=odd):
        run_both(store, "104")
    assert read_manifest(store, "104", "extract") is None


def test_sample_copies_server_side(store: ObjectStore, tiny_capture: Path) -> None:
    upload_capture(store, tiny_capture)
    run_both(store, "018")
    e = ObjectStore(store.cfg)
    ext = {o.key.split("/extract/")[1]: o.etag for o in e.list(store.key(stage_prefix("018", "extract")))}
    smp = {o.key.split("/sample/")[1]: o.etag for o in e.list(store.key(stage_prefix("018", "sample")))}
    shared = set(ext) & set(smp) - {"manifest.json", "frames.json"}
    assert len(shared) == 16 + 2 * 16 * 5
    assert all(ext[k] == smp[k] for k in shared)  # same bytes, as vouched for by the manifests


def test_camera_workers_see_the_callers_current_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers fork from a long-lived server whose environment is frozen when it starts; credentials
    set later in this process (a rotated key, a least-privilege identity) must still reach them."""
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9")  # a client is made, nothing is contacted
    seen = []
    for value in ("first", "second"):
        monkeypatch.setenv("HEADAVATAR_TEST_MARKER", value)
        with worker_pool(2, storage) as pool:
            seen.append(sorted({f.result() for f in [pool.submit(os.getenv, "HEADAVATAR_TEST_MARKER")
                                                     for _ in range(4)]}))
    assert seen == [["first"], ["second"]]

"""Stages 5 and 6 load every training view of a capture into host memory: once, split before loading.

At real size the views are ~21 MB each (2048² image, matte and visibility), ~34 GB for 100 frames x 16
cameras; holding them two or three times over (per-view arrays, their stack, the held-out split's
copies) would exhaust a GPU host's memory before the first step.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import fake_manifest, tiny_config
from headavatar.contract.outputs import OutputWriter
from headavatar.contract.stage import StageContext, read_manifest
from headavatar.imaging import encode_jpg, npz_bytes
from headavatar.layout import FRAMES_INDEX, stage_prefix
from headavatar.storage import ObjectStore
from headavatar.training.views import load_views

pytestmark = pytest.mark.s3
SIZE = 256
SEQUENCES = ["EXP-1-head", "EXP-1-head", "EXP-1-head", "SEN-01-a", "SEN-01-a", "SEN-01-a"]


def _upstream(store: ObjectStore, cams: list[str], out_size: int) -> dict[str, dict[str, bytes]]:
    """Stages 2-4's outputs for six frames x every camera: random pictures, cameras and fits."""
    rng = np.random.default_rng(0)
    folders = [f"{i:04d}" for i in range(len(SEQUENCES))]
    sample = {FRAMES_INDEX: json.dumps({"frames": [{"folder": f, "sequence": s} for f, s in zip(folders, SEQUENCES,
                                                                                              strict=True)]}).encode()}
    matting, fitting = {}, {}
    for fi, folder in enumerate(folders):
        for ci, cam in enumerate(cams):
            sample[f"images/{folder}/image_{cam}.jpg"] = encode_jpg(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
            sample[f"images/{folder}/visible_{cam}.jpg"] = encode_jpg(rng.integers(0, 256, (SIZE, SIZE), np.uint8))
            matting[f"images/{folder}/mask_{cam}.jpg"] = encode_jpg(rng.integers(0, 256, (SIZE, SIZE), np.uint8))
            k = np.array([[out_size, 0, out_size / 2], [0, out_size, out_size / 2], [0, 0, 1]], np.float64)
            e = np.eye(4)
            e[:3, 3] = [fi, ci, 1]
            sample[f"cameras/{folder}/camera_{cam}.npz"] = npz_bytes(intrinsic=k, extrinsic=e)
        fitting[f"params/{folder}/params.npz"] = npz_bytes(pose=np.full((1, 6), fi, np.float64),
                                                           scale=np.ones(1), exp_coeff=np.full((1, 4), fi, np.float64))
        fitting[f"params/{folder}/lmk_3d.npy"] = _npy(np.full((68, 3), fi, np.float32))
    files = {"sample": sample, "matting": matting, "fitting": fitting}
    for stage, stage_files in files.items():
        fake_manifest(store, stage, stage_files)
    return files


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_views_are_read_once_into_their_split_and_hold_what_was_stored(store: ObjectStore, tmp_path: Path) -> None:
    cfg = tiny_config()
    cams, out_size = list(cfg.capture.cameras), cfg.extract.output_size
    files = _upstream(store, cams, out_size)
    ctx = StageContext("meshhead", "018", cfg, store, tmp_path,
                       {s: read_manifest(store, "018", s) for s in ("sample", "matting", "fitting")}, {},
                       OutputWriter(store, store.key(stage_prefix("018", "meshhead"))))
    pixel_bytes = len(SEQUENCES) * len(cams) * SIZE * SIZE * 5  # image (3) + matte + visibility, uint8

    tracemalloc.start()
    try:
        train, held = load_views(ctx, SIZE, False, ("SEN-*",), "meshhead.holdout_sequences")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The pixels once, plus decoding buffers and the S3 client's: not a second copy of them.
    assert peak < 1.3 * pixel_bytes, (peak / 2**20, pixel_bytes / 2**20)
    kept = sum(a.nbytes for v in (train, held) for a in (v.images, v.masks, v.visible))
    assert kept == pixel_bytes

    assert train.folders == ["0000", "0001", "0002"] and held.folders == ["0003", "0004", "0005"]
    assert held.sequences == ["SEN-01-a"] * 3 and held.pose[:, 0].tolist() == [3, 4, 5]
    for views in (train, held):
        for fi, folder in enumerate(views.folders):
            for ci, cam in [(0, cams[0]), (len(cams) - 1, cams[-1])]:
                bgr = cv2.imdecode(np.frombuffer(files["sample"][f"images/{folder}/image_{cam}.jpg"], np.uint8),
                                   cv2.IMREAD_COLOR)
                np.testing.assert_array_equal(views.images[fi, ci], bgr[..., ::-1])
                mask = cv2.imdecode(np.frombuffer(files["matting"][f"images/{folder}/mask_{cam}.jpg"], np.uint8),
                                    cv2.IMREAD_COLOR)[..., 0]
                np.testing.assert_array_equal(views.masks[fi, ci], mask)
                assert views.intrinsics[fi, ci, 0, 0] == pytest.approx(SIZE)  # scaled from out_size to SIZE
                assert views.extrinsics[fi, ci, :, 3].tolist() == [int(folder), ci, 1]
        assert views.landmarks_3d[:, 0, 0].tolist() == [int(f) for f in views.folders]

    everything, none = load_views(ctx, SIZE, False)
    assert none is None and everything.folders == [f"{i:04d}" for i in range(6)]
    np.testing.assert_array_equal(everything.visible[3:], held.visible)

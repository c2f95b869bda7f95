"""The real detector path on a realistic head (issue 22 item 5).

The synthetic head textured with a real face photograph (``--texture astronaut``: scikit-image's
astronaut portrait warped onto the head's landmark positions) is what dlib's offline HOG detector
was trained on: stage 4 runs on its detections, not on ground-truth landmarks.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, cli, prepare_sampled
from headavatar.contract.stage import read_manifest
from headavatar.landmarks.dlib68 import package_model_path
from headavatar.layout import RAW, stage_prefix
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, write_capture
from headavatar.synthetic.render import texture_atlas

pytest.importorskip("dlib")
if importlib.util.find_spec("face_recognition_models") is None:  # its __init__ needs pkg_resources: find, not import
    pytest.skip("face_recognition_models (dlib's 68-point model) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def astronaut_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 cameras, one sequence of 20 frames at the demo size, the head textured with the astronaut's face."""
    root = tmp_path_factory.mktemp("capture018_astronaut")
    write_capture(SyntheticSpec("018", frames=20, sequences=("EXP-1-head",), texture="astronaut", **TINY), root / RAW)
    return root


def test_the_photo_texture_is_opt_in() -> None:
    procedural, photo = texture_atlas(), texture_atlas("astronaut")
    assert procedural.shape == photo.shape
    changed = np.any(procedural != photo, axis=-1)
    assert 0.05 < changed.mean() < 0.3  # the face region only; hair and the back stay procedural
    with pytest.raises(ValueError, match="texture must be one of"):
        SyntheticSpec("018", texture="marble")


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(1800)  # 870 s on 2 loaded cores (synthesis at 256 px and dlib on 64 views)
def test_stage_4_fits_dlib_detections_on_the_photo_textured_head(store: ObjectStore, astronaut_capture: Path,
                                                                 s3_env: dict[str, str]) -> None:
    prepare_sampled(store, astronaut_capture)
    # The model as a user supplies it: the file of the face_recognition_models wheel, put into the bucket once
    # and checked against its pins; the run then uses the default landmarks.dlib_model=asset:dlib68.
    put = cli("assets", "put", "dlib68", str(package_model_path()), env=s3_env)
    assert put.returncode == 0, put.stderr[-2000:]
    r = cli("run", "fitting", "--capture", "018", "--profile", "demo", "--set", "landmarks.detector=dlib",
            env=s3_env, timeout=900)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    prefix = stage_prefix("018", "fitting")
    detections = json.loads(store.get_bytes(store.key(prefix, "landmarks/detections.json")))
    per_frame = detections["score_of_found_face"]
    images = [v for per in per_frame.values() for v in per.values()]
    rate = sum(v is not None for v in images) / len(images)
    by_camera = {c: sum(per[c] is not None for per in per_frame.values()) / len(per_frame)
                 for c in next(iter(per_frame.values()))}
    metrics = read_manifest(store, "018", "fitting").metrics
    summary = {"detection_rate": rate, "images": len(images), "by_camera": by_camera,
               **{k: v for k, v in metrics.items() if "error" in k or "frames" in k}}
    print(json.dumps(summary), file=sys.stderr, flush=True)
    assert detections["detector"] == "dlib"
    # Measured (2026-12-02, landmarks.dlib_threshold -0.8): 43 of 64 images (0.67); cameras 222200038-47
    # (-35 to +55 degrees) found the face in all 4 frames; of the six outermost (the face in profile),
    # 222200048 in 3 frames, the others in none; dlib's points 11.5 px from the true landmarks on average,
    # 23.3 px at worst (no false face); reprojection error median 7.6 px; rotation error 6.6 deg mean. At
    # threshold 0 (dlib's default): 0.42 of the images, rotation error 10.0 deg.
    assert rate > 0.5, summary  # most views
    assert sum(r == 1.0 for r in by_camera.values()) >= 8, summary
    assert metrics["frames_fitted"] == len(per_frame) and metrics["frames_excluded"] == 0, summary
    assert metrics["reprojection_error_px_median"] <= 9.0, summary
    assert metrics["detection_error_px_mean"] <= 12.0 and metrics["detection_error_px_max"] <= 40.0, summary
    assert metrics["rotation_error_deg_mean"] <= 10.0, summary

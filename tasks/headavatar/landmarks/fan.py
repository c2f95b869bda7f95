"""The reference detector: 2D-FAN from the ``face_alignment`` package (BSD), on the GPU when present.

face_alignment downloads its weights into the torch hub cache on first use, so this detector needs
internet once per host (or a pre-filled ``$TORCH_HOME``); the offline alternative is ``dlib``.
"""

from __future__ import annotations

import numpy as np

from headavatar.devices import resolve_device
from headavatar.errors import ConfigError
from headavatar.landmarks.base import LandmarkDetector, Landmarks
from headavatar.settings import LandmarksConfig


class FanDetector(LandmarkDetector):
    name = "face_alignment"

    def __init__(self, cfg: LandmarksConfig):
        try:
            import face_alignment
        except ImportError:
            raise ConfigError("landmarks.detector=face_alignment needs the face-alignment package "
                              "(pip install face-alignment; in the CUDA image, built with WITH_FAN=1, the default); "
                              "or set landmarks.detector=dlib, the default") from None
        device = resolve_device(cfg.device)
        try:
            self.fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=str(device),
                                                   flip_input=False, face_detector=cfg.fan_face_detector)
        except OSError as e:  # weight download failed (no internet) or unreadable cache
            raise ConfigError(f"face_alignment could not load its weights ({e}); pre-fill $TORCH_HOME/hub on "
                              "hosts without internet, or set landmarks.detector=dlib, the default") from None

    def detect(self, rgb: np.ndarray) -> Landmarks | None:
        points, scores, boxes = self.fa.get_landmarks_from_image(rgb, return_landmark_score=True,
                                                                 return_bboxes=True)
        if not points:
            return None
        best = int(np.argmax([float(np.sum(s)) for s in scores]))
        return Landmarks(np.asarray(points[best][:, :2], np.float64), np.clip(np.asarray(scores[best]), 0, 1),
                         float(boxes[best][4]))

"""Where things live in the bucket: the NeRSemble raw layouts and the per-stage output folders.

Raw, NeRSemble v1 (as its archives unpack, under ``<prefix>/raw/``)::

    camera_params/<id>/camera_params.json
    sequence_BACKGROUND_part-1/<id>/BACKGROUND/image_<cam>.jpg
    sequence_<SEQ>_part-<n>/<id>/<SEQ>/cam_<cam>.mp4

Raw, NeRSemble v2 (a participant folder of ``nersemble-data download``, synced as is to
``<prefix>/raw/v2/<id>/``)::

    calibration/camera_params.json
    calibration/color_calibration.json
    sequences/BACKGROUND/image_<cam>.jpg
    sequences/<SEQ>/images/cam_<cam>.mp4

Upload finished: a ``_COMPLETE`` marker (any content) written after the rest, at
``camera_params/<id>/_COMPLETE`` (v1) or ``v2/<id>/_COMPLETE`` (v2); see ``headavatar.upload``.

Stage outputs: ``<prefix>/avatars/<id>/<stage>/...`` with ``manifest.json`` written last.
"""

from __future__ import annotations

import re

from headavatar.capture_id import validate_capture_id

RAW = "raw"
AVATARS = "avatars"
MANIFEST = "manifest.json"
FRAMES_INDEX = "frames.json"  # which source frame each output frame folder holds
BACKGROUND_SEQUENCE = "sequence_BACKGROUND_part-1"
GROUND_TRUTH = "synthetic_ground_truth"

V2 = "v2"  # raw/v2/<id>/ holds a v2 participant folder
LAYOUTS = ("v1", "v2")

VIDEO_NAME = re.compile(r"^cam_(\d+)\.mp4$")
BACKGROUND_NAME = re.compile(r"^image_(\d+)\.jpg$")
COMPLETE_MARKER = "_COMPLETE"


def camera_params_key(capture: str) -> str:
    return f"{RAW}/camera_params/{validate_capture_id(capture)}/camera_params.json"


def background_key(capture: str, camera: str) -> str:
    return f"{RAW}/{BACKGROUND_SEQUENCE}/{validate_capture_id(capture)}/BACKGROUND/image_{camera}.jpg"


def video_key(capture: str, sequence: str, camera: str, part: int = 1) -> str:
    return f"{RAW}/sequence_{sequence}_part-{part}/{validate_capture_id(capture)}/{sequence}/cam_{camera}.mp4"


def complete_marker_key(capture: str, layout: str) -> str:
    """The object an upload writes last to say the capture is whole (in the capture's own folder)."""
    folder = v2_root(capture) if layout == V2 else f"{RAW}/camera_params/{validate_capture_id(capture)}"
    return f"{folder}/{COMPLETE_MARKER}"


def v2_root(capture: str) -> str:
    return f"{RAW}/{V2}/{validate_capture_id(capture)}"


def v2_camera_params_key(capture: str) -> str:
    return f"{v2_root(capture)}/calibration/camera_params.json"


def v2_color_calibration_key(capture: str) -> str:
    return f"{v2_root(capture)}/calibration/color_calibration.json"


def v2_background_key(capture: str, camera: str) -> str:
    return f"{v2_root(capture)}/sequences/BACKGROUND/image_{camera}.jpg"


def v2_video_key(capture: str, sequence: str, camera: str) -> str:
    return f"{v2_root(capture)}/sequences/{sequence}/images/cam_{camera}.mp4"


def stage_prefix(capture: str, stage: str) -> str:
    return f"{AVATARS}/{validate_capture_id(capture)}/{stage}"


def ground_truth_prefix(capture: str) -> str:
    return f"{GROUND_TRUTH}/{validate_capture_id(capture)}"

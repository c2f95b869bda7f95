"""Discover and validate a raw NeRSemble capture in object storage, in the v1 or the v2 layout.

Everything a stage needs to trust about the raw data is checked here, before any frame is
decoded, and each problem is reported as one line naming the key at fault.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from headavatar.capture_id import validate_capture_id
from headavatar.color import parse_color_calibration
from headavatar.contract.manifest import digest
from headavatar.errors import RawCaptureError
from headavatar.layout import (
    BACKGROUND_NAME,
    BACKGROUND_SEQUENCE,
    RAW,
    V2,
    VIDEO_NAME,
    background_key,
    camera_params_key,
    v2_background_key,
    v2_camera_params_key,
    v2_color_calibration_key,
    v2_root,
)
from headavatar.settings import PipelineConfig, sequence_selected
from headavatar.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)
SEQUENCE_DIR = re.compile(r"^sequence_(.+)_part-(\d+)$")


NERSEMBLE_FRAME_SIZE = (2200, 3208)  # (width, height) of NeRSemble's videos, which its shared intrinsics refer to
FRAME_SIZE_TOLERANCE = 0.05  # principal point's distance from a frame's centre, as a fraction of its side


@dataclass(frozen=True)
class CameraParams:
    intrinsic: np.ndarray  # (3, 3)
    world_to_cam: dict[str, np.ndarray]  # camera -> (4, 4)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames the intrinsics refer to.

        camera_params.json does not state it (neither layout does), so the principal point stands for
        it: the frame it is the centre of. A calibration of NeRSemble's rig (within the tolerance of
        its 2200x3208 frames) refers to exactly those frames; others to the frame centred on it.
        """
        cx, cy = self.intrinsic[0, 2], self.intrinsic[1, 2]
        implied = (round(float(2 * cx + 1)), round(float(2 * cy + 1)))
        return NERSEMBLE_FRAME_SIZE if _near(implied, NERSEMBLE_FRAME_SIZE) else implied


def _near(size: tuple[int, int], ref: tuple[int, int]) -> bool:
    return all(abs(a - b) <= FRAME_SIZE_TOLERANCE * b for a, b in zip(size, ref, strict=True))


def frame_size_problem(params: CameraParams, width: int, height: int, name: str, pkey_uri: str) -> str | None:
    """One line naming the video ``name`` when its frames are not the size the calibration is for
    (a resized, cropped or rotated video would be cropped and projected wrongly); None when they are."""
    want = params.frame_size
    ok = (width, height) == want if want == NERSEMBLE_FRAME_SIZE else _near((width, height), want)
    if ok:
        return None
    cx, cy = params.intrinsic[0, 2], params.intrinsic[1, 2]
    return (f"{name}: frames are {width}x{height}, but the intrinsics of {pkey_uri} are for {want[0]}x{want[1]} "
            f"frames (principal point {cx:.1f}, {cy:.1f}): a resized, cropped or rotated video cannot be used")


@dataclass(frozen=True)
class Sequence:
    name: str  # e.g. "EXP-1-head"
    part: int
    videos: dict[str, ObjectInfo]  # camera -> video object

    @property
    def sort_key(self) -> tuple[str, int]:
        return (self.name, self.part)

    @property
    def label(self) -> str:
        """Unique within a capture (a sequence may come in several parts)."""
        return f"{self.name}_part-{self.part}"


@dataclass(frozen=True)
class RawCapture:
    capture: str
    cameras: tuple[str, ...]
    camera_params: CameraParams
    backgrounds: dict[str, ObjectInfo]
    sequences: tuple[Sequence, ...]  # deterministic (sorted) order
    params_object: ObjectInfo
    layout: str = "v1"  # which NeRSemble raw layout the capture was found in (headavatar.layout.LAYOUTS)
    color_matrices: dict[str, np.ndarray] | None = None  # camera -> 3xT (v2 color_calibration.json)
    color_object: ObjectInfo | None = None

    def digest(self) -> str:
        """Content identity of everything stage 1 reads (keys, sizes, ETags)."""
        objs = [self.params_object, *self.backgrounds.values(),
                *(v for s in self.sequences for v in s.videos.values())]
        if self.color_object is not None:
            objs.append(self.color_object)
        return digest(sorted((o.key, o.size, o.etag) for o in objs))


def parse_camera_params(data: bytes, where: str) -> CameraParams:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RawCaptureError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "world_2_cam" not in doc or "intrinsics" not in doc:
        raise RawCaptureError(f"{where}: expected keys 'world_2_cam' and 'intrinsics'")
    intr = _matrix(doc["intrinsics"], (3, 3), f"{where}: intrinsics")
    if abs(np.linalg.det(intr)) < 1e-9:
        raise RawCaptureError(f"{where}: intrinsics matrix is singular")
    if not isinstance(doc["world_2_cam"], dict) or not doc["world_2_cam"]:
        raise RawCaptureError(f"{where}: world_2_cam must map camera ids to 4x4 matrices")
    extr = {}
    for cam, m in doc["world_2_cam"].items():
        mat = _matrix(m, (4, 4), f"{where}: world_2_cam[{cam}]")
        if abs(np.linalg.det(mat[:3, :3])) < 1e-9:
            raise RawCaptureError(f"{where}: world_2_cam[{cam}] is not invertible")
        extr[str(cam)] = mat
    return CameraParams(intr, extr)


def _matrix(value: object, shape: tuple[int, int], what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RawCaptureError(f"{what} must be a {shape[0]}x{shape[1]} matrix of numbers") from None
    if arr.shape != shape:
        raise RawCaptureError(f"{what} must be {shape[0]}x{shape[1]}, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise RawCaptureError(f"{what} contains non-finite values")
    return arr


def discover(store: ObjectStore, capture: str, config: PipelineConfig) -> RawCapture:
    """The capture in whichever layout it was uploaded in (v1 or v2; both at once is an error)."""
    capture = validate_capture_id(capture)
    raw_root = store.key(RAW)
    v2_objs = list(store.list(store.key(v2_root(capture))))
    v1_params = store.head(store.key(camera_params_key(capture)))
    v1_found: dict[str, list[ObjectInfo]] = {}
    for d in store.list_dirs(raw_root):
        if SEQUENCE_DIR.match(d) and (objs := list(store.list(f"{raw_root}/{d}/{capture}"))):
            v1_found[d] = objs
    if v2_objs and (v1_params is not None or v1_found):
        raise RawCaptureError(
            f"capture {capture} is in both raw layouts ({store.uri(store.key(v2_root(capture)))}/ and "
            f"{store.uri(raw_root)}/camera_params|sequence_*/{capture}/): remove one of them")
    if v2_objs:
        return _discover_v2(store, capture, config, v2_objs)
    if v1_params is None and not v1_found:
        there = sorted(set(store.list_dirs(store.key(RAW, V2))) | set(store.list_dirs(f"{raw_root}/camera_params")))
        raise RawCaptureError(f"unknown capture {capture!r}: nothing under {store.uri(raw_root)}/*/{capture}/ "
                              f"(v1 layout) or {store.uri(store.key(v2_root(capture)))}/ (v2 layout); captures "
                              f"there: {', '.join(there[:20]) + (' ...' if len(there) > 20 else '') or 'none'}; "
                              f"upload it first (docs/data.md) or check the id")
    return _discover_v1(store, capture, config, v1_params, v1_found)


def _discover_v1(store: ObjectStore, capture: str, config: PipelineConfig, params_obj: ObjectInfo | None,
                 found: dict[str, list[ObjectInfo]]) -> RawCapture:
    pkey = store.key(camera_params_key(capture))
    if params_obj is None:
        raise RawCaptureError(f"capture {capture}: missing {store.uri(pkey)}")
    params = _load_params(store, pkey, config)
    bg_objs = {m.group(1): o for o in found.get(BACKGROUND_SEQUENCE, [])
               if (m := BACKGROUND_NAME.match(o.key.rsplit("/", 1)[-1]))}
    backgrounds = _backgrounds(store, capture, config, bg_objs, lambda cam: background_key(capture, cam))
    by_sequence: dict[tuple[str, int], list[ObjectInfo]] = {}
    for d, objs in found.items():
        if d != BACKGROUND_SEQUENCE:
            name, part = SEQUENCE_DIR.match(d).groups()
            by_sequence[(name, int(part))] = objs
    sequences = _sequences(store, capture, config, params, pkey, by_sequence, "sequence_{name}_part-{part}")
    if not sequences:
        where = f"{store.uri(store.key(RAW))}/sequence_*/{capture}/"
        raise RawCaptureError(f"capture {capture}: no usable sequence under {where}{_selection_hint(config)}")
    return RawCapture(capture, tuple(config.capture.cameras), params, backgrounds, tuple(sequences), params_obj)


def _discover_v2(store: ObjectStore, capture: str, config: PipelineConfig, objs: list[ObjectInfo]) -> RawCapture:
    """A ``nersemble-data download`` participant folder: calibration/ and sequences/<SEQ>/."""
    root = store.key(v2_root(capture))
    by_rel = {o.key[len(root) + 1:]: o for o in objs}
    pkey, ckey = store.key(v2_camera_params_key(capture)), store.key(v2_color_calibration_key(capture))
    params_obj = by_rel.get("calibration/camera_params.json")
    if params_obj is None:
        raise RawCaptureError(f"capture {capture} (v2 layout): missing {store.uri(pkey)}")
    params = _load_params(store, pkey, config)
    color_obj = by_rel.get("calibration/color_calibration.json")
    color = None
    if color_obj is None and config.extract.color_correction:
        raise RawCaptureError(f"capture {capture} (v2 layout): missing {store.uri(ckey)} (v2 frames are recorded "
                              "to be colour-corrected; set extract.color_correction=false to use them uncorrected)")
    if color_obj is not None:
        color = parse_color_calibration(store.get_bytes(ckey), store.uri(ckey))
        missing = [c for c in config.capture.cameras if c not in color]
        if missing:
            raise RawCaptureError(f"{store.uri(ckey)}: no colour-correction matrix for camera(s) {', '.join(missing)}")
    bg_objs, by_sequence = {}, {}
    for rel, o in by_rel.items():
        parts = rel.split("/")
        if len(parts) == 3 and parts[:2] == ["sequences", "BACKGROUND"] and (m := BACKGROUND_NAME.match(parts[2])):
            bg_objs[m.group(1)] = o
        elif len(parts) == 4 and parts[0] == "sequences" and parts[2] == "images" and parts[1] != "BACKGROUND":
            by_sequence.setdefault((parts[1], 1), []).append(o)
    backgrounds = _backgrounds(store, capture, config, bg_objs, lambda cam: v2_background_key(capture, cam))
    sequences = _sequences(store, capture, config, params, pkey, by_sequence, "sequences/{name}")
    if not sequences:
        raise RawCaptureError(f"capture {capture}: no usable sequence under {store.uri(root)}/sequences/*/images/"
                              f"{_selection_hint(config)}")
    return RawCapture(capture, tuple(config.capture.cameras), params, backgrounds, tuple(sequences), params_obj,
                      layout="v2", color_matrices={c: color[c] for c in config.capture.cameras} if color else None,
                      color_object=color_obj)


def _load_params(store: ObjectStore, pkey: str, config: PipelineConfig) -> CameraParams:
    params = parse_camera_params(store.get_bytes(pkey), store.uri(pkey))
    missing = [c for c in config.capture.cameras if c not in params.world_to_cam]
    if missing:
        raise RawCaptureError(f"{store.uri(pkey)}: no world_2_cam for camera(s) {', '.join(missing)}")
    return params


def _backgrounds(store: ObjectStore, capture: str, config: PipelineConfig, bg_objs: dict[str, ObjectInfo],
                 key_of: Callable[[str], str]) -> dict[str, ObjectInfo]:
    for cam in config.capture.cameras:
        if cam not in bg_objs:
            raise RawCaptureError(f"capture {capture}: missing background plate {store.uri(store.key(key_of(cam)))}"
                                  f"{_camera_hint(bg_objs)}")
        if bg_objs[cam].size == 0:
            raise RawCaptureError(f"capture {capture}: empty background plate {store.uri(bg_objs[cam].key)}")
    return {c: bg_objs[c] for c in config.capture.cameras}


def _camera_hint(present: dict[str, object]) -> str:
    """For a partial download: which cameras there are, and the setting that selects them."""
    if not present:
        return ""
    return (f" (cameras present: {', '.join(sorted(present))}; set capture.cameras to the ones downloaded, "
            "e.g. --set 'capture.cameras=[...]')")


def _selection_hint(config: PipelineConfig) -> str:
    c = config.capture
    return f" (capture.include_sequences={list(c.include_sequences)}, exclude_sequences={list(c.exclude_sequences)})"


def _sequences(store: ObjectStore, capture: str, config: PipelineConfig, params: CameraParams, pkey: str,
               by_sequence: dict[tuple[str, int], list[ObjectInfo]], where: str) -> list[Sequence]:
    """The selected sequences, each with a non-empty video from every configured camera, sorted."""
    cameras = config.capture.cameras
    sequences = []
    for (name, part), objs in sorted(by_sequence.items()):
        label = where.format(name=name, part=part)
        if not sequence_selected(name, config.capture.include_sequences, config.capture.exclude_sequences):
            log.info("capture %s: skipping sequence %s (capture.include_sequences / exclude_sequences)", capture, label)
            continue
        videos: dict[str, ObjectInfo] = {}
        for o in objs:
            m = VIDEO_NAME.match(o.key.rsplit("/", 1)[-1])
            if m is None:
                continue
            cam = m.group(1)
            if cam not in params.world_to_cam:
                raise RawCaptureError(f"{store.uri(o.key)}: camera {cam} is not in {store.uri(pkey)}")
            if cam in cameras:
                videos[cam] = o
        absent = [c for c in cameras if c not in videos]
        if absent:
            raise RawCaptureError(
                f"sequence {label} of capture {capture} has no video for camera(s) {', '.join(absent)}; "
                "frames must be synchronous across cameras, so it cannot be used (remove it, add the videos, "
                "exclude it with capture.exclude_sequences or narrow capture.cameras)"
            )
        for o in videos.values():
            if o.size == 0:
                raise RawCaptureError(f"{store.uri(o.key)}: zero-length video")
        sequences.append(Sequence(name, part, videos))
    sequences.sort(key=lambda s: s.sort_key)
    return sequences


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int

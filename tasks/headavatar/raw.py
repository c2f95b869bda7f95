"""Discover and validate a raw NeRSemble capture in object storage.

Everything a stage needs to trust about the raw data is checked here, before any frame is
decoded, and each problem is reported as one line naming the key at fault.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from headavatar.capture_id import validate_capture_id
from headavatar.contract.manifest import digest
from headavatar.errors import RawCaptureError
from headavatar.layout import BACKGROUND_NAME, BACKGROUND_SEQUENCE, RAW, VIDEO_NAME, background_key, camera_params_key
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectInfo, ObjectStore
from headavatar.video import open_video

log = logging.getLogger(__name__)
SEQUENCE_DIR = re.compile(r"^sequence_(.+)_part-(\d+)$")


@dataclass(frozen=True)
class CameraParams:
    intrinsic: np.ndarray  # (3, 3)
    world_to_cam: dict[str, np.ndarray]  # camera -> (4, 4)


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

    def digest(self) -> str:
        """Content identity of everything stage 1 reads (keys, sizes, ETags)."""
        objs = [self.params_object, *self.backgrounds.values(),
                *(v for s in self.sequences for v in s.videos.values())]
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
    capture = validate_capture_id(capture)
    raw_root = store.key(RAW)
    skip = config.capture.skip_sequence_keywords
    cameras = config.capture.cameras

    pkey = store.key(camera_params_key(capture))
    params_obj = store.head(pkey)
    seq_dirs = [d for d in store.list_dirs(raw_root) if SEQUENCE_DIR.match(d)]
    found: dict[str, list[ObjectInfo]] = {}
    for d in seq_dirs:
        objs = list(store.list(f"{raw_root}/{d}/{capture}"))
        if objs:
            found[d] = objs
    if params_obj is None and not found:
        raise RawCaptureError(f"unknown capture {capture!r}: nothing under {store.uri(raw_root)}/*/{capture}/")
    if params_obj is None:
        raise RawCaptureError(f"capture {capture}: missing {store.uri(pkey)}")
    params = parse_camera_params(store.get_bytes(pkey), store.uri(pkey))
    missing = [c for c in cameras if c not in params.world_to_cam]
    if missing:
        raise RawCaptureError(f"{store.uri(pkey)}: no world_2_cam for camera(s) {', '.join(missing)}")

    bg_objs = {m.group(1): o for o in found.get(BACKGROUND_SEQUENCE, [])
               if (m := BACKGROUND_NAME.match(o.key.rsplit("/", 1)[-1]))}
    for cam in cameras:
        if cam not in bg_objs:
            plate = store.uri(store.key(background_key(capture, cam)))
            raise RawCaptureError(f"capture {capture}: missing background plate {plate}")
        if bg_objs[cam].size == 0:
            raise RawCaptureError(f"capture {capture}: empty background plate {store.uri(bg_objs[cam].key)}")

    sequences = []
    for d, objs in sorted(found.items()):
        if d == BACKGROUND_SEQUENCE:
            continue
        name, part = SEQUENCE_DIR.match(d).groups()
        if any(k in d for k in skip):
            log.info("capture %s: skipping sequence %s (matches %s)", capture, d, skip)
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
                f"sequence {d} of capture {capture} has no video for camera(s) {', '.join(absent)}; "
                "frames must be synchronous across cameras, so it cannot be used (remove it or add the videos)"
            )
        for o in videos.values():
            if o.size == 0:
                raise RawCaptureError(f"{store.uri(o.key)}: zero-length video")
        sequences.append(Sequence(name, int(part), videos))
    if not sequences:
        where = f"{store.uri(raw_root)}/sequence_*/{capture}/"
        raise RawCaptureError(f"capture {capture}: no usable sequence under {where}")
    sequences.sort(key=lambda s: s.sort_key)
    return RawCapture(capture, tuple(cameras), params, {c: bg_objs[c] for c in cameras}, tuple(sequences), params_obj)


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int


def probe_video(path: Path, name: str) -> VideoInfo:
    """Frame count and size from the container, with a one-line error for unreadable files."""
    try:
        with open_video(str(path)) as c:
            if not c.streams.video:
                raise RawCaptureError(f"{name}: no video stream")
            s = c.streams.video[0]
            frames = s.frames
            if frames <= 0:  # no frame count in the header: count packets (cheap, no decoding)
                frames = sum(1 for p in c.demux(s) if p.size)
            w, h = s.codec_context.width, s.codec_context.height
    except RawCaptureError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise RawCaptureError(f"{name}: unreadable or corrupt video ({type(e).__name__}: {e})") from None
    if frames <= 0:
        raise RawCaptureError(f"{name}: video has zero frames")
    if w <= 0 or h <= 0:
        raise RawCaptureError(f"{name}: video has no frame size")
    return VideoInfo(frames, w, h)

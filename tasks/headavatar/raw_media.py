"""Open every raw video and background plate before hours of work: what ``headavatar validate`` checks.

``raw.discover`` sees listings and calibration files only; a truncated video, one of random bytes
or a plate that is not an image passes it and fails stage 1 much later. Here each video is opened
straight from S3 through ranged reads (a header, the first frame and the tail; no download of the
whole file): container and codec readable, the first frame decodes, the last frame's data is
there and whole, and codec, frame count and resolution agree across a sequence's cameras
(resolution across the whole capture, as stage 1 needs). Every plate is fetched and decoded and
must have the videos' resolution, and that resolution must be the calibration's. All problems are
returned, one line each naming the object. Stage 1 probes its videos and decodes its plates with
the same functions (:func:`probe_remote_video`, :func:`decode_plate`) and fails on the first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import av
import cv2
import numpy as np

from headavatar.errors import RawCaptureError
from headavatar.raw import RawCapture, frame_size_problem
from headavatar.storage import ObjectInfo, ObjectStore
from headavatar.video import open_video

T = TypeVar("T")
TAIL_FRAMES = 8  # the tail read starts this many frames before the last one (covers B-frame reordering)


@dataclass(frozen=True)
class VideoFacts:
    codec: str
    frames: int
    width: int
    height: int


class MediaProblem(RawCaptureError):
    """One unreadable object (its one-line message names it). ``validate`` collects them; stage 1,
    which probes and decodes with the same functions, fails on the first."""


def probe_remote_video(store: ObjectStore, obj: ObjectInfo) -> VideoFacts:
    """Header facts of a video in S3, after decoding its first frame and reading its last packets."""
    name = store.uri(obj.key)
    reader = store.range_reader(obj)
    try:
        with open_video(reader) as c:
            if not c.streams.video:
                raise MediaProblem(f"{name}: no video stream")
            s = c.streams.video[0]
            cc = s.codec_context
            facts = VideoFacts(cc.name, s.frames, cc.width, cc.height)
            if facts.frames <= 0 or facts.width <= 0 or facts.height <= 0:
                raise MediaProblem(f"{name}: the container gives no frame count or frame size")
            cc.skip_frame = "DEFAULT"
            s.thread_type = "SLICE"  # frame threads would decode several frames before handing out the first
            if next(iter(c.decode(s)), None) is None:
                raise MediaProblem(f"{name}: the first frame does not decode")
            _check_tail(c, s, name)
    except MediaProblem:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise MediaProblem(f"{name}: unreadable or corrupt video ({type(e).__name__}: {e})") from None
    return facts


def _check_tail(c: av.container.InputContainer, s: av.video.stream.VideoStream, name: str) -> None:
    """The last frame's packet is in the file and whole: a file cut short (with its index at the
    front, so it still opens) misses it. Seeks near the end, so only the tail is read."""
    if not s.duration:
        return  # no duration in the header: nothing to compare with (stage 1 still counts every frame)
    step = s.duration / s.frames
    last = (s.start_time or 0) + s.duration - step
    c.seek(int(max(s.start_time or 0, last - TAIL_FRAMES * step)), stream=s, backward=True, any_frame=True)
    pts = []
    for p in c.demux(s):
        if p.size:
            if p.is_corrupt:
                raise MediaProblem(f"{name}: truncated video (packet at byte {p.pos} is cut short)")
            pts.append(p.pts)
    if not pts or max(pts) < last - step / 2:
        raise MediaProblem(f"{name}: truncated video (its last frames are missing: the header promises "
                           f"{s.frames} frames)")


def decode_plate(data: bytes, name: str, size: tuple[int, int] | None) -> np.ndarray:
    """The plate as a BGR image, of the videos' resolution (width, height) when known: the one decode
    of plates for ``validate`` and stage 1 (a truncated JPEG is refused, not grey-filled)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise MediaProblem(f"{name}: background plate is not a decodable image")
    if size is not None and (img.shape[1], img.shape[0]) != size:
        raise MediaProblem(f"{name}: background plate is {img.shape[1]}x{img.shape[0]}, "
                           f"the videos are {size[0]}x{size[1]}")
    return img


def check_plate(store: ObjectStore, obj: ObjectInfo, size: tuple[int, int] | None) -> None:
    """The plate decodes as an image, of the videos' resolution (width, height) when known."""
    decode_plate(store.get_bytes(obj.key), store.uri(obj.key), size)


def _attempt(fn: Callable[..., T], *args: object) -> T | MediaProblem:
    try:
        return fn(*args)
    except MediaProblem as e:
        return e


def check_media(store: ObjectStore, raw: RawCapture, workers: int = 16) -> list[str]:
    """Every problem with the capture's videos and plates, one line each (empty: all readable)."""
    videos = [(s.label, cam, o) for s in raw.sequences for cam, o in sorted(s.videos.items())]
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="validate") as pool:
        facts = list(pool.map(lambda v: _attempt(probe_remote_video, store, v[2]), videos))
        good = {(label, cam): (o, f) for (label, cam, o), f in zip(videos, facts, strict=True)
                if isinstance(f, VideoFacts)}
        problems = [str(f) for f in facts if isinstance(f, MediaProblem)]
        problems += _disagreements(store, raw, good)
        sizes = Counter((f.width, f.height) for _, f in good.values())
        size = sizes.most_common(1)[0][0] if sizes else None
        if size is not None:  # the videos' common size (odd ones are reported above) against the calibration
            first = next(o for _, (o, f) in sorted(good.items(), key=lambda kv: _order(raw, kv[0]))
                         if (f.width, f.height) == size)
            pkey = store.uri(raw.params_object.key)
            if p := frame_size_problem(raw.camera_params, *size, store.uri(first.key), pkey):
                problems.append(p)
        plates = pool.map(lambda o: _attempt(check_plate, store, o, size), raw.backgrounds.values())
        problems += [str(p) for p in plates if isinstance(p, MediaProblem)]
    return problems


def _order(raw: RawCapture, key: tuple[str, str]) -> tuple[int, int]:
    """Stage 1's order of videos: sequences as discovered, cameras as configured."""
    labels = [s.label for s in raw.sequences]
    return labels.index(key[0]), raw.cameras.index(key[1])


def _disagreements(store: ObjectStore, raw: RawCapture, good: dict[tuple[str, str], tuple[ObjectInfo, VideoFacts]]
                   ) -> list[str]:
    """Videos whose codec or frame count differs from most of their sequence's cameras, or whose
    resolution differs from most of the capture's videos."""
    out = []
    groups = [(f"the other cameras of sequence {s.label}", [k for k in good if k[0] == s.label],
               lambda f: (f.codec, f.frames), lambda v: f"{v[0]}, {v[1]} frames") for s in raw.sequences]
    groups.append(("the capture's other videos", list(good), lambda f: (f.width, f.height),
                   lambda v: f"{v[0]}x{v[1]}"))
    for others, keys, fact, text in groups:
        common = Counter(fact(good[k][1]) for k in keys).most_common(1)
        for k in keys:
            if common and fact(good[k][1]) != common[0][0]:
                out.append(f"{store.uri(good[k][0].key)}: {text(fact(good[k][1]))}, {others} have "
                           f"{text(common[0][0])}")
    return out

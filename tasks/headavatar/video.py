"""Decode only the frames that are needed, each video once.

H.264 frames depend on earlier reference frames, so a wanted frame cannot be reached without
decoding its references. Frames that nothing references (non-reference B/P frames) and that are
not wanted themselves are skipped inside the decoder (FFmpeg's ``skip_frame = NONREF``), toggled
packet by packet. Frames are identified by presentation timestamp rank, found in a cheap first
pass over the packets (no decoding), so no frame-rate assumption is made. The BGR conversion is
FFmpeg's swscale, the same path as ``cv2.VideoCapture`` (pixel-identical, see tests).

Containers are opened with :func:`open_video`: a plain ``av.open`` decodes frames of H.264 to
guess codec parameters (up to 7 frames while it guesses the B-frame delay, about 50 ms per open
at 2200x3208), which is work thrown away when the caller decodes or only reads the header.
A container can also be read from a :class:`headavatar.storage.RangeReader` (ranged reads of an object in S3): stage 1
reads every video's header that way, without downloading it, to plan the frames before any video
is fetched (:func:`probe`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import av
import numpy as np

from headavatar.errors import RawCaptureError


def open_video(path: str | BinaryIO) -> av.container.InputContainer:
    """``av.open`` without the stream-info decode: size and frame count come from the header."""
    return av.open(path, options={"skip_frame": "nonkey"})


def probe(source: str | BinaryIO, name: str) -> tuple[int, int, int]:
    """``(frames, width, height)`` from the container, with a one-line error for unreadable videos
    (from a path or a file such as :meth:`headavatar.storage.ObjectStore.range_reader`'s)."""
    try:
        with open_video(source) as c:
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
    return frames, w, h


def presentation_order(path: str, name: str) -> list[int]:
    """Packet pts of the first video stream, sorted: index k is video frame k."""
    try:
        with open_video(path) as c:
            s = c.streams.video[0]
            pts = sorted(p.pts for p in c.demux(s) if p.pts is not None and p.size)
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise RawCaptureError(f"{name}: unreadable or corrupt video ({type(e).__name__}: {e})") from None
    return pts


def decode_frames(path: str, wanted: set[int], name: str,
                  stats: dict[str, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame index, BGR image)`` for each wanted frame, in presentation order.

    ``stats["decoded"]`` counts every frame the decoder produced (wanted or referenced), and
    ``stats["fed"]`` every packet it was given (skipped ones included).
    Raises RawCaptureError if a wanted frame is missing or the stream is corrupt.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("decoded", 0)
    stats.setdefault("fed", 0)
    if not wanted:
        return
    index = {p: k for k, p in enumerate(presentation_order(path, name))}
    missing = sorted(wanted - set(index.values()))
    if missing:
        raise RawCaptureError(f"{name}: has {len(index)} frames, frame {missing[0]} was requested (truncated video)")
    found, unsent = 0, set(wanted)

    def output(frames: list[av.VideoFrame]) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal found
        for frame in frames:
            stats["decoded"] += 1
            k = index.get(frame.pts)
            if k in wanted:
                found += 1
                yield k, frame.to_ndarray(format="bgr24")

    try:
        with open_video(path) as c:
            s = c.streams.video[0]
            s.thread_type = "NONE"  # per-packet skip_frame needs a decoder without frame threads
            cc = s.codec_context
            for packet in c.demux(s):
                k = index.get(packet.pts)
                if packet.pts is not None:
                    cc.skip_frame = "DEFAULT" if k in wanted else "NONREF"
                stats["fed"] += 1
                yield from output(cc.decode(packet))  # the final empty packet flushes the decoder
                unsent.discard(k)
                if not unsent:
                    # Every wanted frame is in the decoder, and with it every frame it references
                    # (references precede their users in decode order): flush out the wanted frames
                    # still held for reordering instead of decoding the frames that follow.
                    yield from output(cc.decode(None))
                    break
    except av.FFmpegError as e:
        raise RawCaptureError(f"{name}: corrupt video data ({type(e).__name__}: {e})") from None
    if found != len(wanted):
        raise RawCaptureError(f"{name}: decoded {found} of {len(wanted)} wanted frames (corrupt video)")

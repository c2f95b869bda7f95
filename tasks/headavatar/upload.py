"""Is a capture's upload finished? A marker the upload writes last, else a quiet window.

Seeing every camera of every visible sequence is not enough: a multi-sequence upload caught
half-way looks complete. So ingestion also asks this: the capture's ``_COMPLETE`` marker
(``headavatar.layout.complete_marker_key``) exists and no raw object of the capture is newer than
it; or, for uploads that write no marker, none of its raw objects changed for
``ingest.quiet_minutes``. A marker older than some object (a sequence added after it) does not
count: the late upload must write it again, or fall back to the quiet window.

Times are the objects' ``LastModified`` (the S3 server's clock) against this host's clock, which
is fine at the scale of the quiet window (minutes) on NTP-synchronised hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from headavatar.layout import RAW, V2, complete_marker_key, v2_root
from headavatar.raw import SEQUENCE_DIR
from headavatar.settings import IngestConfig
from headavatar.storage import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class UploadState:
    finished: bool
    why: str  # one line: what made it finished, or what it waits for


def raw_objects(store: ObjectStore, capture: str, layout: str) -> list[ObjectInfo]:
    """Every raw object of the capture, selected sequences or not (any of them may still be arriving)."""
    if layout == V2:
        return list(store.list(store.key(v2_root(capture))))
    raw_root = store.key(RAW)
    objs = list(store.list(f"{raw_root}/camera_params/{capture}"))
    for d in store.list_dirs(raw_root):
        if SEQUENCE_DIR.match(d):
            objs += store.list(f"{raw_root}/{d}/{capture}")
    return objs


def upload_state(store: ObjectStore, capture: str, layout: str, config: IngestConfig,
                 now: float | None = None) -> UploadState:
    """Whether the upload of ``capture`` (found in ``layout``) is finished, and why (see the module doc)."""
    marker_key = store.key(complete_marker_key(capture, layout))
    objs = raw_objects(store, capture, layout)
    marker = next((o for o in objs if o.key == marker_key), None)
    newest = max((o.modified for o in objs if o.key != marker_key), default=0.0)
    if marker is not None and marker.modified >= newest:
        return UploadState(True, f"completion marker {store.uri(marker_key)}")
    idle = ((time.time() if now is None else now) - newest) / 60
    quiet = config.quiet_minutes
    if quiet is not None and idle >= quiet:
        return UploadState(True, f"no raw object changed for {idle:.0f} min (ingest.quiet_minutes={quiet:g})")
    waits = "objects changed after its completion marker" if marker else "no completion marker"
    fallback = "" if quiet is None else f", or for {quiet:g} min without a change (ingest.quiet_minutes)"
    return UploadState(False, f"upload not finished: {waits}, last change {idle:.1f} min ago; "
                              f"waiting for {store.uri(marker_key)} to be written after the upload{fallback}")


def mark_complete(store: ObjectStore, capture: str, layout: str) -> str:
    """Write the capture's completion marker (after its last object); returns its URI."""
    key = store.key(complete_marker_key(capture, layout))
    store.put_bytes(key, b"")
    return store.uri(key)


def capture_of(raw_rel: str) -> tuple[str, str] | None:
    """(capture id, layout) of a key relative to ``raw/``, for the capture folders of either layout."""
    parts = raw_rel.split("/")
    if len(parts) < 3:
        return None
    if parts[0] == V2:
        return parts[1], V2
    if parts[0] == "camera_params" or SEQUENCE_DIR.match(parts[0]):
        return parts[1], "v1"
    return None


def carry_marker(store: ObjectStore, archive: ObjectInfo, dests: list[str]) -> list[str]:
    """After an archive is unpacked: its members are new objects, but a capture whose marker was written
    after the archive was uploaded had declared them part of a finished upload, so its marker is
    written again (newer than the members). A marker older than the archive stays as it is."""
    raw_root = store.key(RAW)
    renewed = []
    for capture, layout in sorted({c for d in dests if (c := capture_of(d[len(raw_root) + 1:]))}):
        marker = store.head(store.key(complete_marker_key(capture, layout)))
        if marker is not None and marker.modified >= archive.modified:
            renewed.append(mark_complete(store, capture, layout))
    return renewed

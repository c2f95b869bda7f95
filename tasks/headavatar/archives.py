"""Unpack NeRSemble ``.zip`` deliveries under ``raw/`` into the raw layout, S3 to S3.

Archives are read through ranged GETs (a zip's directory is at its end, so it needs random access,
not a download) and each member is streamed into a multipart upload; members are unpacked in
parallel, each thread with its own reader. Where a member lands: an archive
``raw/<dir>/<name>.zip`` whose entries start with ``<name>/`` unpacks into ``raw/<dir>/``; one
whose entries do not (``018/EXP-1-head/cam_*.mp4`` inside ``sequence_EXP-1-head_part-1.zip``)
unpacks into ``raw/<dir>/<name>/``. A marker under ``ingest/unpacked/`` records the archive's
ETag once every member is in place, so a finished archive is skipped and a half-unpacked one
(killed, S3 gone) is redone. A capture's ``_COMPLETE`` marker written after its archives is
renewed once they are unpacked (``headavatar.upload.carry_marker``), so the unpacked members do not
look like a later upload.

What goes wrong is told apart by what it is, never by its message:

* a broken archive (not a zip, truncated, a damaged member, an unsafe path, no file in it,
  :class:`RawCaptureError`) is reported (``failed``: the command exits 2, the ingestion task fails
  once) and set aside: moved to ``raw/_rejected/<its path under raw/>`` with ``<that>.reason.txt``
  beside it, so the next run no longer meets it and a fixed archive uploaded under the old name is
  unpacked like any new one. Set aside, not deleted: it is the user's upload;
* the object store not answering (:class:`StorageUnavailable`: down, 5xx, throttled after the
  client's retries) ends the command at once with exit 75, retryable: a later try redoes what was
  not finished (the markers above);
* any other storage error (access denied) is reported and the archive left where it is.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

from headavatar.errors import RawCaptureError, StorageError, StorageUnavailable
from headavatar.layout import RAW
from headavatar.storage import MB, ObjectInfo, ObjectStore
from headavatar.upload import carry_marker

log = logging.getLogger(__name__)
MARKERS = "ingest/unpacked"
IGNORED = ("__MACOSX/", ".DS_Store")
REJECTED = "_rejected"  # raw/_rejected/<path under raw/>: broken archives set aside, with <path>.reason.txt


def open_archive(store: ObjectStore, obj: ObjectInfo) -> zipfile.ZipFile:
    reader = io.BufferedReader(store.range_reader(obj, block=8 * MB), buffer_size=8 * MB)
    try:
        return zipfile.ZipFile(reader)
    except zipfile.BadZipFile as e:
        raise RawCaptureError(f"{store.uri(obj.key)}: not a readable zip archive ({e})") from None


@dataclass(frozen=True)
class Member:
    name: str  # path inside the archive
    dest: str  # key it unpacks to
    size: int


def plan(store: ObjectStore, obj: ObjectInfo, zf: zipfile.ZipFile) -> list[Member]:
    """Where every member goes; refuses paths that would leave the raw prefix (zip-slip)."""
    raw_root = store.key(RAW)
    rel = PurePosixPath(obj.key[len(raw_root) + 1:])
    stem, parent = rel.stem, rel.parent
    files = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith(IGNORED)
             and PurePosixPath(i.filename).name not in IGNORED]
    for i in files:
        parts = PurePosixPath(i.filename).parts
        if i.filename.startswith("/") or "\\" in i.filename or any(p in ("..", ".", "") for p in parts):
            raise RawCaptureError(f"{store.uri(obj.key)}: unsafe path {i.filename!r} in the archive")
    nested = all(PurePosixPath(i.filename).parts[0] == stem for i in files)
    base = parent if nested else parent / stem
    return [Member(i.filename, "/".join(p for p in (raw_root, str(base), i.filename) if p not in ("", ".")),
                   i.file_size) for i in files]


def marker_key(store: ObjectStore, obj: ObjectInfo) -> str:
    return store.key(MARKERS, obj.key[len(store.key(RAW)) + 1:] + ".json")


def unpack(store: ObjectStore, obj: ObjectInfo, workers: int = 4) -> int:
    """Unpack one archive; returns the number of members written (0 when it was done before)."""
    mkey = marker_key(store, obj)
    if store.exists(mkey) and json.loads(store.get_bytes(mkey)).get("etag") == obj.etag:
        return 0
    with open_archive(store, obj) as zf:
        members = plan(store, obj, zf)
    if not members:
        raise RawCaptureError(f"{store.uri(obj.key)}: the archive holds no file")
    local = threading.local()

    def put(m: Member) -> None:
        if not hasattr(local, "zf"):
            local.zf = open_archive(store, obj)
        try:
            with local.zf.open(m.name) as src:
                store.upload_stream(src, m.dest)
        except (zipfile.BadZipFile, EOFError, OSError) as e:  # CRC mismatch, truncated member
            raise RawCaptureError(f"{store.uri(obj.key)}: member {m.name!r} is damaged ({e})") from None

    done = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="unpack") as pool:
        for _ in pool.map(put, members):
            done += 1
            if done % 8 == 0 or done == len(members):
                log.info("%s: %d/%d members unpacked", store.uri(obj.key), done, len(members))
    # The capture's completion marker first, this archive's "unpacked" record last: a crash in between
    # unpacks again next time instead of leaving a marker older than the members.
    for uri in carry_marker(store, obj, [m.dest for m in members]):
        log.info("%s: upload marked complete after the archive, marker renewed: %s", store.uri(obj.key), uri)
    store.put_bytes(mkey, json.dumps({"archive": obj.key, "etag": obj.etag, "size": obj.size,
                                      "members": {m.name: m.dest for m in members}}).encode())
    return len(members)


def rejected_key(store: ObjectStore, obj: ObjectInfo) -> str:
    """Where a broken archive is set aside: ``raw/_rejected/`` + its path under ``raw/``."""
    return store.key(RAW, REJECTED, obj.key[len(store.key(RAW)) + 1:])


def reject(store: ObjectStore, obj: ObjectInfo, reason: str) -> str | None:
    """Set a broken archive aside (copy to ``raw/_rejected/...``, its reason beside it, then delete the
    original); returns where it went, or None when the archive changed since it was read (a fixed one
    uploaded meanwhile: that one is tried next time, nothing is moved)."""
    now = store.head(obj.key)
    if now is None or now.etag != obj.etag:
        log.warning("%s changed while it was read: not set aside, tried again next time", store.uri(obj.key))
        return None
    dest = rejected_key(store, obj)
    store.copy(obj.key, dest, obj.size)
    store.put_bytes(dest + ".reason.txt", (
        f"{reason}\n\narchive: {store.uri(obj.key)} (etag {obj.etag}, {obj.size} bytes)\n"
        f"set aside: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by headavatar unpack\n"
        f"to ingest it: upload a fixed archive to {store.uri(obj.key)}; this copy can then be deleted\n"
    ).encode(), content_type="text/plain; charset=utf-8")
    store.delete(obj.key)
    return store.uri(dest)


def unpack_all(store: ObjectStore, workers: int = 4) -> dict[str, list[str]]:
    """Every ``.zip`` under ``raw/`` (not those set aside under ``raw/_rejected/``):
    {"unpacked": [...], "skipped": [...], "failed": ["key: why[; set aside as ...]", ...]}.
    Raises :class:`StorageUnavailable` (exit 75) when the object store does not answer."""
    out: dict[str, list[str]] = {"unpacked": [], "skipped": [], "failed": []}
    rejected = store.key(RAW, REJECTED) + "/"
    for obj in store.list(store.key(RAW)):
        if not obj.key.lower().endswith(".zip") or obj.key.startswith(rejected):
            continue
        try:
            n = unpack(store, obj, workers)
        except StorageUnavailable:
            raise  # transient: the whole command is retried; finished archives are skipped then
        except RawCaptureError as e:
            try:
                where = reject(store, obj, str(e))
                message = f"{e}; set aside as {where}" if where else str(e)
            except StorageUnavailable:
                raise
            except StorageError as moving:  # e.g. no right to delete under raw/: reported again next time
                message = f"{e}; could not be set aside ({moving})"
            log.error("%s", message)
            out["failed"].append(message)
            continue
        except StorageError as e:
            log.error("%s", e)
            out["failed"].append(str(e))
            continue
        out["unpacked" if n else "skipped"].append(store.uri(obj.key))
    return out

"""Concurrent, bounded upload of a stage's outputs, recording size + sha256 of every file."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

from headavatar.contract.manifest import FileEntry
from headavatar.layout import MANIFEST
from headavatar.storage import ObjectStore, sha256_bytes, sha256_file

RESERVED_PREFIX = "_"  # stage-private state (checkpoints, locks) that outlives one attempt


def state_key(prefix: str, rel: str) -> str:
    """Key of a stage's state that outlives one attempt (checkpoints, its lock) under the stage's
    ``prefix``: never in the manifest, never stale."""
    return f"{prefix.rstrip('/')}/{RESERVED_PREFIX}state/{rel}"


def check_relpath(rel: str) -> str:
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or rel == MANIFEST or parts[0].startswith(RESERVED_PREFIX)):
        raise ValueError(f"invalid output path {rel!r}")
    return rel


class OutputWriter:
    """Uploads in the background; at most ``max_inflight`` payloads are held in memory."""

    def __init__(self, store: ObjectStore, prefix: str, max_inflight: int | None = None):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_inflight or store.cfg.max_concurrency * 2)
        self._futures: list[Future] = []

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{check_relpath(rel)}"

    def record(self, rel: str, entry: FileEntry) -> None:
        """Account for an output uploaded by someone else (a worker process)."""
        with self._lock:
            if rel in self.entries:
                raise ValueError(f"output {rel!r} written twice")
            self.entries[rel] = entry

    def _submit(self, fn, *args) -> None:
        self._slots.acquire()
        try:
            fut = self.store.pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)

    def put_bytes(self, rel: str, data: bytes) -> None:
        key = self.key(rel)
        self.record(rel, FileEntry(len(data), sha256_bytes(data)))
        self._submit(self.store.put_bytes, key, data)

    def put_file(self, rel: str, path: Path) -> None:
        key = self.key(rel)
        self.record(rel, FileEntry(path.stat().st_size, sha256_file(path)))
        self._submit(self.store.upload_file, path, key)

    def copy_from(self, src_key: str, rel: str, entry: FileEntry) -> None:
        """Server-side copy of an object whose size and digest an upstream manifest vouches for."""
        key = self.key(rel)
        self.record(rel, entry)
        self._submit(self.store.copy, src_key, key, entry.size)

    def wait(self) -> None:
        """Block until every transfer is done; raise the first failure."""
        if (first := self.drain()) is not None:
            raise first

    def drain(self) -> BaseException | None:
        """Block until every transfer is done; return (not raise) the first failure."""
        futures, self._futures = self._futures, []
        first = None
        for f in futures:
            first = first or f.exception()
        return first

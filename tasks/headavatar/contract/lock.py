"""One writer per (capture, stage): a lease object in the bucket, taken with a conditional PUT.

Two DAG runs of one capture (a manual trigger beside an ingested one) would otherwise write the
same output keys and manifests interleaved. The lease ``_state/lock.json`` is created with
``If-None-Match: *`` (atomic on S3 and SeaweedFS), renewed by a heartbeat thread, and released at
the end. A second run finds it held and fails with :class:`StageBusy` (exit 75: Airflow retries
it later, by when the first run's manifest makes it a cache hit). A lease whose holder stopped
renewing it (a SIGKILLed process, a lost container) expires after ``ttl`` seconds; on the same
host a holder whose pid is gone is taken over at once. Take-overs are conditional on the old
lease's ETag, so two waiting runs cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from botocore.exceptions import BotoCoreError, ClientError

from headavatar.errors import StageBusy
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageLock:
    def __init__(self, store: ObjectStore, key: str, what: str, ttl: float = 90.0):
        self.store, self.key, self.what, self.ttl = store, key, what, ttl
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "renewed": time.time(), "ttl": self.ttl}).encode()

    def _put(self, **condition: str) -> str | None:
        """The new ETag, or None when the condition failed (someone else holds or changed it)."""
        try:
            r = self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=self._body(), **condition)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return None
            raise self.store._error(e, self.key, "lock") from e
        except BotoCoreError as e:
            raise self.store._error(e, self.key, "lock") from e
        return r["ETag"]

    def _holder(self) -> tuple[dict, str] | None:
        try:
            r = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise self.store._error(e, self.key, "read lock") from e
        except BotoCoreError as e:
            raise self.store._error(e, self.key, "read lock") from e
        try:
            return json.loads(r["Body"].read()), r["ETag"]
        except ValueError:
            return {}, r["ETag"]  # unreadable: treated as expired

    def _expired(self, holder: dict) -> bool:
        if time.time() - holder.get("renewed", 0) > holder.get("ttl", self.ttl):
            return True
        return holder.get("host") == self.owner["host"] and not pid_alive(int(holder.get("pid", 0)))

    def acquire(self) -> None:
        self.etag = self._put(IfNoneMatch="*")
        if self.etag is None:
            found = self._holder()
            if found is None:  # released in between
                self.etag = self._put(IfNoneMatch="*")
            elif self._expired(found[0]):
                log.warning("%s: taking over the lock of %s (no longer renewed)", self.what, found[0].get("host"))
                self.etag = self._put(IfMatch=found[1])
            if self.etag is None:
                holder = (found or ({}, ""))[0]
                since = time.strftime("%H:%M:%S", time.gmtime(holder.get("renewed", 0)))
                raise StageBusy(f"{self.what} is being computed by another run ({holder.get('host')} pid "
                                f"{holder.get('pid')}, renewed {since} UTC; lock {self.store.uri(self.key)}); "
                                "retry when it has finished")
        self._thread = threading.Thread(target=self._renew, name="stage-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as e:  # S3 briefly away: try again at the next beat
                log.warning("%s: lock renewal failed (%s)", self.what, e)
                continue
            if etag is None:
                log.error("%s: the lock was taken over by another run", self.what)
                self.lost.set()
                return
            self.etag = etag

    def check(self) -> None:
        """Call before committing results: a run that lost its lease must not write the manifest."""
        if self.lost.is_set():
            raise StageBusy(f"{self.what}: lost the lock {self.store.uri(self.key)} to another run; "
                            "this run's results are not committed")

    def release(self) -> None:
        """Best effort: a lease that cannot be deleted (S3 away) expires after ``ttl``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None or self.lost.is_set():
            return
        try:
            found = self._holder()
            if found is not None and found[1] == self.etag:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
        except Exception as e:
            log.warning("%s: could not release the lock (%s); it expires in %.0f s", self.what, e, self.ttl)

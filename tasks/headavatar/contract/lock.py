"""One writer per (capture, stage): a lease object in the bucket, taken with a conditional PUT, and a fence.

Two DAG runs of one capture (a manual trigger beside an ingested one) would otherwise write the
same output keys and manifests interleaved. The lease ``_state/lock.json`` is created with
``If-None-Match: *`` (atomic on S3 and SeaweedFS), renewed with ``If-Match`` on its ETag, and
released at the end. A second run finds it held and stops with :class:`StageBusy` (exit 79,
``EXIT_BUSY``): the Airflow task waits (rescheduled, no retry used) and runs again later, by when the
first run's manifest makes it a cache hit, or its lease has expired and this run computes the stage.
The lease names its holder (host, pid, since when: the holder's clock, for people only).

Expiry reads one clock, the object store's: a lease is free when the store's ``Date`` minus the
lease's ``LastModified`` exceeds its ttl (on the same host, a holder whose pid is gone at once).
Take-overs are conditional on the old lease's ETag, so two waiting runs cannot both win.

Fencing: the holder counts on its own monotonic clock (``CLOCK_BOOTTIME``, which a suspended or
SIGSTOPped process does not escape) from the moment it sent its last successful renewal. Every
request of the stage that writes or deletes first calls :meth:`StageLock.fence` (a hook on the
store's client, ``ObjectStore.fence_with``): past half the ttl it renews first, synchronously,
and once a renewal failed, or none succeeded for ttl minus a margin, it raises "lost the lock"
(:class:`LostLock`, exit 75: a failed attempt, retried) and nothing is sent. Since the store counts
the ttl from when it received the renewal, which is after it was sent, the holder stops writing
before anyone else may start. Worker processes fence on the same clock, shared with them
(:meth:`share`, :func:`shared_fence`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from multiprocessing.sharedctypes import RawArray
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from headavatar.errors import LostLock, StageBusy
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
_TAKEN = (409, 412, 404)  # the lease changed or went: someone else holds it, or it was freed and taken


def now() -> float:
    """Seconds on a clock that keeps counting while this process is stopped or the host sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lost_lock(what: str, uri: str) -> LostLock:
    return LostLock(f"{what}: lost the lock {uri} to another run; this run writes and deletes nothing more "
                     "and its results are not committed")


class StageLock:
    def __init__(self, store: ObjectStore, key: str, what: str, ttl: float = 90.0):
        self.store, self.key, self.what, self.ttl = store, key, what, ttl
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(16).hex(),
                      "since": datetime.now(UTC).isoformat(timespec="seconds")}  # read by people, not by expiry
        self.margin = max(1.0, ttl / 5)  # clock-rate differences and the time a request is in flight
        # The lease's own client: short timeouts, few retries, and no fence (it renews the fence).
        self.client = store.new_client(attempts=2, connect_timeout=min(5.0, ttl / 5), read_timeout=min(10.0, ttl / 3))
        self.etag: str | None = None
        self.renewed = 0.0  # now() when the last successful renewal was sent
        self.lost = threading.Event()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shared: Any = None  # RawArray [renewed, valid_for, lost] for worker processes

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "ttl": self.ttl}).encode()

    def _put(self, **condition: str) -> str | None:
        """The new ETag, or None when the condition failed (someone else holds or changed it)."""
        try:
            r = self.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=self._body(), **condition)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in _TAKEN:
                return None
            raise self.store._error(e, self.key, "lock") from e
        except BotoCoreError as e:
            raise self.store._error(e, self.key, "lock") from e
        return r["ETag"]

    def _holder(self) -> tuple[dict, str, float] | None:
        """The lease's content, ETag and age on the store's clock (its ``Date`` minus ``LastModified``)."""
        try:
            r = self.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise self.store._error(e, self.key, "read lock") from e
        except BotoCoreError as e:
            raise self.store._error(e, self.key, "read lock") from e
        date = r["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        served = parsedate_to_datetime(date) if date else datetime.now(UTC)  # a store without Date: ours
        age = (served - r["LastModified"]).total_seconds()
        try:
            return json.loads(r["Body"].read()), r["ETag"], age
        except ValueError:
            return {}, r["ETag"], float("inf")  # unreadable: treated as expired

    def _expired(self, holder: dict, age: float) -> bool:
        if age > float(holder.get("ttl", self.ttl)):
            return True
        return holder.get("host") == self.owner["host"] and not pid_alive(int(holder.get("pid", 0)))

    def _took(self, etag: str | None, sent: float) -> bool:
        if etag is None:
            return False
        self.etag, self.renewed = etag, sent
        self._publish()
        return True

    def acquire(self) -> None:
        sent = now()
        if not self._took(self._put(IfNoneMatch="*"), sent):
            found = self._holder()
            sent = now()
            if found is None:  # released in between
                self._took(self._put(IfNoneMatch="*"), sent)
            elif self._expired(found[0], found[2]):
                log.warning("%s: taking over the lock of %s pid %s (not renewed for %.0f s by the store's clock)",
                            self.what, found[0].get("host"), found[0].get("pid"), found[2])
                self._took(self._put(IfMatch=found[1]), sent)
            if self.etag is None:
                holder, _, age = found or ({}, "", 0.0)
                since = f" since {holder['since']}" if holder.get("since") else ""
                raise StageBusy(f"{self.what} is being computed by another run ({holder.get('host')} pid "
                                f"{holder.get('pid')}{since}, renewed {age:.0f} s ago; lock "
                                f"{self.store.uri(self.key)}); retry when it has finished")
        self._thread = threading.Thread(target=self._beat, name="stage-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """One conditional renewal (call with the mutex held). A renewal whose answer was lost and whose
        retry found the ETag changed is recognised by the token in the lease."""
        sent = now()
        try:
            if self._took(self._put(IfMatch=self.etag), sent):
                return
            found = self._holder()
        except Exception as e:  # the store briefly away: the fence decides whether writing may go on
            log.warning("%s: lock renewal failed (%s)", self.what, e)
            return
        if found is not None and found[0].get("token") == self.owner["token"]:
            self._took(found[1], sent)
            return
        log.error("%s: the lock was taken over by another run", self.what)
        self._lose()

    def _lose(self) -> None:
        self.lost.set()
        self._publish()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if self.lost.is_set():
                    return
                self._renew()

    def fence(self, renew: bool = False) -> None:
        """Raise "lost the lock" unless this run surely still holds the lease; call before each write.

        Renews first when half the ttl has passed since the last renewal (or ``renew``: before the manifest)."""
        with self._mutex:
            if not self.lost.is_set() and (renew or now() - self.renewed > self.ttl / 2):
                self._renew()
            unrenewed = now() - self.renewed
            if not self.lost.is_set() and unrenewed > self.ttl - self.margin:
                log.error("%s: the lock was not renewed for %.1f s", self.what, unrenewed)
                self._lose()
            if self.lost.is_set():
                raise lost_lock(self.what, self.store.uri(self.key))

    def share(self) -> tuple[Any, str]:
        """What worker processes fence with (:func:`shared_fence`): this lease's clock, shared."""
        if self._shared is None:
            self._shared = RawArray("d", 3)
            self._publish()
        return self._shared, f"{self.what}|{self.store.uri(self.key)}"

    def _publish(self) -> None:
        if self._shared is not None:
            self._shared[0], self._shared[1] = self.renewed, self.ttl - self.margin
            self._shared[2] = 1.0 if self.lost.is_set() else 0.0

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
                self.client.delete_object(Bucket=self.store.bucket, Key=self.key)
        except Exception as e:
            log.warning("%s: could not release the lock (%s); it expires in %.0f s", self.what, e, self.ttl)


def shared_fence(shared: tuple[Any, str]) -> None:
    """The fence of a worker process: the lease's holder renews it; the worker only stops in time."""
    clock, name = shared
    if clock[2] or now() - clock[0] > clock[1]:
        what, uri = name.split("|", 1)
        raise lost_lock(what, uri)

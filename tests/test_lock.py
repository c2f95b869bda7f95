"""The stage lease and its fence (issue 34.5): expiry on the store's clock; a lost lease writes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from headavatar.contract import lock as lock_module
from headavatar.contract.lock import StageLock, shared_fence
from headavatar.errors import StageBusy
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3
DEAD_PID = 2**22 + 1  # above Linux's pid_max: no process has it


def _lease(store: ObjectStore, ttl: float = 5, **owner: object) -> StageLock:
    lk = StageLock(store, store.key("locks/lock.json"), "capture 018 stage extract", ttl=ttl)
    lk.owner.update(owner)
    return lk


@pytest.mark.slow  # waits out a lease
def test_expiry_reads_the_stores_clock_not_the_holders(store: ObjectStore) -> None:
    holder = _lease(store, host="another-host")
    holder.acquire()
    holder._stop.set()  # the holder stops renewing (a host that died), its lease stays in the bucket
    holder._thread.join()
    # No host's clock enters the decision: the lease records no time; its age is the store's Date
    # minus its LastModified, both of the store's clock.
    assert "renewed" not in json.loads(store.get_bytes(holder.key)) and holder._holder()[2] < 5
    with pytest.raises(StageBusy, match="is being computed by another run"):
        _lease(store).acquire()
    time.sleep(6.5)  # past the ttl on the store's clock
    taker = _lease(store)
    taker.acquire()
    taker.release()


def test_a_holder_that_lost_its_lease_can_neither_write_nor_delete(store: ObjectStore, tmp_path: Path) -> None:
    loser = _lease(store, pid=DEAD_PID)  # a pid that is gone: a run on this host takes over at once
    loser.acquire()
    store.fence_with(loser.fence)
    key = store.key("avatars/018/extract/a.txt")
    store.put_bytes(key, b"written while holding the lease")
    shared = loser.share()
    shared_fence(shared)  # a worker process may write too

    loser.renewed -= 10  # as after a pause of 10 s (SIGSTOP): its renewals are overdue
    winner = _lease(store)
    winner.acquire()
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (6 * 1024 * 1024))
    for attempt in (lambda: store.put_bytes(key, b"late"), lambda: store.delete(key),
                    lambda: store.delete_many([key]), lambda: store.upload_file(big, key),
                    lambda: store.put_new(store.key("avatars/018/extract/manifest.json"), b"{}")):
        with pytest.raises(StageBusy, match="lost the lock"):
            attempt()
    with pytest.raises(StageBusy, match="lost the lock"):
        shared_fence(shared)
    store.fence_with(None)
    assert store.get_bytes(key) == b"written while holding the lease"
    assert not store.exists(store.key("avatars/018/extract/manifest.json"))
    winner.release()
    loser.release()


def test_a_worker_stops_writing_before_the_lease_can_expire(store: ObjectStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker cannot renew: it stops once its holder has not renewed for ttl minus the margin."""
    holder = _lease(store)
    holder.acquire()
    shared = holder.share()
    t = lock_module.now()
    shared_fence(shared)
    monkeypatch.setattr(lock_module, "now", lambda: t + holder.ttl - holder.margin + 0.1)
    with pytest.raises(StageBusy, match="lost the lock"):
        shared_fence(shared)
    monkeypatch.undo()
    holder.release()


def test_a_renewal_whose_answer_was_lost_is_recognised_by_its_token(store: ObjectStore) -> None:
    holder = _lease(store)
    holder.acquire()
    holder.etag = '"an-etag-of-a-renewal-whose-answer-never-came"'
    holder.fence(renew=True)  # 412 on the old ETag, but the lease carries this run's token
    assert not holder.lost.is_set() and holder.etag != '"an-etag-of-a-renewal-whose-answer-never-came"'
    holder.release()
    assert not store.exists(holder.key)


def test_a_manifest_is_written_only_where_none_is(store: ObjectStore) -> None:
    key = store.key("avatars/018/sample/manifest.json")
    assert store.put_new(key, b"first")
    assert store.put_new(key, b"first")  # a retry whose first attempt landed finds its own bytes
    assert not store.put_new(key, b"second")
    assert store.get_bytes(key) == b"first"


def test_the_cli_exits_79_while_another_run_holds_the_stage_and_75_for_temporary_errors(
        store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str]) -> None:
    """The stage CLI's exit codes as the operators read them: EXIT_BUSY (wait, no retry used) for a stage another
    live run is computing, naming the holder; EXIT_TEMPFAIL (75, retried) for the temporary errors."""
    import os
    import socket

    from conftest import cli, upload_capture
    from headavatar.contract.outputs import state_key
    from headavatar.errors import (
        EXIT_BUSY,
        EXIT_FINAL,
        EXIT_TEMPFAIL,
        GpuUnavailable,
        LostLock,
        ScratchFull,
        StorageUnavailable,
    )
    from headavatar.layout import stage_prefix

    assert (EXIT_FINAL, EXIT_TEMPFAIL, EXIT_BUSY) == (2, 75, 79) and StageBusy.exit_code == EXIT_BUSY
    assert {e.exit_code for e in (StorageUnavailable, ScratchFull, GpuUnavailable, LostLock)} == {EXIT_TEMPFAIL}
    upload_capture(store, tiny_capture)
    holder = StageLock(store, state_key(store.key(stage_prefix("018", "extract")), "lock.json"), "other run")
    holder.acquire()
    try:
        r = cli("run", "extract", "--capture", "018", "--profile", "ci")
    finally:
        holder.release()
    assert r.returncode == EXIT_BUSY, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: capture 018 stage extract is being computed by another run (") and (
        f"{socket.gethostname()} pid {os.getpid()} since {holder.owner['since']}, renewed " in line), line
    # The object store away (nothing listens on port 9): temporary, retried.
    away = cli("run", "extract", "--capture", "018", "--profile", "ci", "--set", "storage.max_attempts=1",
               env={"HEADAVATAR_S3_ENDPOINT": "http://127.0.0.1:9"})
    assert away.returncode == EXIT_TEMPFAIL, away.stderr[-2000:]

"""Faults injected for real into running stages; nothing half-written is taken as done, nothing is lost.

`pytest -m faults` runs this suite alone. It has its own SeaweedFS server (so it can stop it
mid-run without disturbing other tests) and compares every faulted capture with an undisturbed
run of the same settings, file by file (content digests from the manifests). Faults:

* every stage SIGKILLed twice at a random point of its computation, then retried;
* the S3 server stopped for a while and restarted in the middle of every stage;
* a large multipart upload and a download with the S3 server restarted half-way;
* two runs of one stage for one capture at once, and one paused past its lease while another finished;
* the scratch disk full (a 256 KiB tmpfs);
* the MLflow server stopped while a stage trains.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import copy_stages, output_digests, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.errors import EXIT_BUSY, StorageUnavailable
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

pytestmark = [pytest.mark.faults, pytest.mark.s3, pytest.mark.slow]
BUCKET = "faults"
FAST = ["--profile", "ci", "--set", "meshhead.steps=60", "--set", "meshhead.checkpoint_every=15",
        "--set", "meshhead.eval_every=30", "--set", "meshhead.keep_checkpoint_every=0",
        "--set", "gaussianhead.steps=40", "--set", "gaussianhead.checkpoint_every=10",
        "--set", "gaussianhead.eval_every=20", "--set", "gaussianhead.keep_checkpoint_every=0"]
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    s3 = EmbeddedS3(tmp_path_factory.mktemp("faults-s3")).start()
    s3.create_bucket(BUCKET)
    try:
        yield s3
    finally:
        s3.stop()


def env_for(server: EmbeddedS3, prefix: str, **extra: str) -> dict[str, str]:
    return {**os.environ, **server.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": prefix,
            **extra}


def store_for(env: dict[str, str], *overrides: str) -> ObjectStore:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return ObjectStore(load_config(None, list(overrides)).storage)
    finally:
        os.environ.clear()
        os.environ.update(saved)


class StageProcess:
    """One ``headavatar run`` subprocess whose stderr is watched for the moment it starts computing."""

    def __init__(self, env: dict[str, str], stage: str, *extra: str):
        self.stage = stage
        self.proc = subprocess.Popen([sys.executable, "-m", "headavatar.cli", "run", stage, "--capture", "018",
                                      *FAST, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.computing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if ": running (inputs" in line:
                self.computing.set()

    def wait(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def reference(server: EmbeddedS3, tiny_capture: Path) -> ObjectStore:
    """The undisturbed run every faulted one is compared with: all six stages of capture 018 with ``FAST``,
    under the prefix ``reference`` (whose store is returned)."""
    env = env_for(server, "reference")
    store = store_for(env)
    upload_capture(store, tiny_capture)
    for stage in STAGE_NAMES:
        run = StageProcess(env, stage)
        assert run.wait() == 0, run.stderr[-3000:]
    return store


def done_or_absent(store: ObjectStore, stage: str) -> bool:
    """The invariant after any fault: no manifest, or one whose every file is there at its size."""
    m = read_manifest(store, "018", stage)
    if m is None:
        return True
    prefix = store.key(stage_prefix("018", stage))
    sizes = {o.key[len(prefix) + 1:]: o.size for o in store.list(prefix)}
    return all(sizes.get(rel) == e.size for rel, e in m.files.items())


def undo(store: ObjectStore, stage: str) -> None:
    """If an earlier attempt got to the end before its fault, make the stage "not done" again (as a
    cleared task whose inputs changed would be) so the next fault lands in a computation. Kept
    checkpoints still count: a training stage resumes."""
    store.delete(store.key(stage_prefix("018", stage), "manifest.json"))


def outputs(store: ObjectStore, stage: str) -> dict[str, str]:
    return output_digests(store, "018", stage)


def fault_mid_computation(store: ObjectStore, env: dict[str, str], stage: str, wall: float, frac: float,
                          inject: Callable[[StageProcess], str | None]) -> StageProcess:
    """Run the stage and inject a fault ``frac * wall`` seconds into its computation. A run that
    finished first (a resumed training is shorter) is redone with an earlier fault, so every
    planned fault lands; ``inject`` says how it struck the computation, or None where it came too late."""
    missed = []
    for _ in range(8):
        undo(store, stage)
        run = StageProcess(env, stage)
        assert run.computing.wait(120), run.stderr[-3000:]
        t0 = time.monotonic()
        time.sleep(frac * wall)
        struck = time.monotonic() - t0
        if run.proc.poll() is None and (landed := inject(run)):
            print(f"{stage}: {landed}, struck at {struck:.2f} s of the computation ({wall:.2f} s undisturbed)")
            return run
        run.wait()
        missed.append(f"rc {run.proc.returncode} after {time.monotonic() - t0:.2f} s")
        frac /= 3
    pytest.fail(f"{stage}: every run finished before the fault could strike ({'; '.join(missed)})")


@pytest.mark.timeout(2400)  # 620 s on a quiet 2-core machine (2026-12-01); a loaded one is far slower
def test_faults_in_every_stage_lose_nothing(server: EmbeddedS3, reference: ObjectStore, tiny_capture: Path,
                                           tmp_path: Path) -> None:
    rng = random.Random(20261124)
    env = env_for(server, "faulted")
    ref, store = reference, store_for(env)
    upload_capture(store, tiny_capture)
    faults: list[str] = []

    def kill(run: StageProcess) -> str | None:
        os.killpg(run.proc.pid, signal.SIGKILL)
        # Landed in the computation: killed (not exited by itself in between), and before its manifest.
        landed = run.wait() == KILLED and read_manifest(store, "018", run.stage) is None
        return "SIGKILL" if landed else None

    def restart_s3(run: StageProcess) -> str | None:
        struck = datetime.now(UTC)
        server.stop()  # S3 answers nothing from here; stop() itself then takes seconds (SIGTERM, grace, SIGKILL)
        time.sleep(2)
        server.start()
        # Landed in the computation: the run, alive when the outage began, gave up on it (a retryable
        # exit), or went on through it and wrote its manifest after it began.
        if (rc := run.wait()) != 0:
            return f"S3 outage, exit {rc}"
        m = read_manifest(store, "018", run.stage)
        assert m is not None, run.stderr[-3000:]
        return "S3 outage survived" if datetime.fromisoformat(m.finished_at) > struck else None

    for stage in STAGE_NAMES:
        wall = read_manifest(ref, "018", stage).wall_time_s

        for attempt in range(2):  # SIGKILL somewhere in the computation, then the retry goes on
            fault_mid_computation(store, env, stage, wall, rng.uniform(0.05, 0.7), kill)
            faults.append(f"{stage}: SIGKILL #{attempt + 1}")
            assert done_or_absent(store, stage)

        # The object store goes away for a while in the middle.
        run = fault_mid_computation(store, env, stage, wall, rng.uniform(0.05, 0.5), restart_s3)
        faults.append(f"{stage}: S3 restarted")
        rc = run.wait()
        assert rc in (0, 75), run.stderr[-3000:]  # survived by retrying, or a retryable one-line failure
        if rc == 75:
            assert run.stderr.strip().splitlines()[-1].startswith("error: "), run.stderr[-2000:]
        assert done_or_absent(store, stage)

        final = StageProcess(env, stage)
        assert final.wait() == 0, final.stderr[-3000:]
        assert outputs(store, stage) == outputs(ref, stage), stage
        assert store.abort_multipart_uploads(store.key(stage_prefix("018", stage))) == 0

    # Two runs of one stage at once: one computes, the other is told it is busy (exit 79: its task waits for
    # the first, no retry used). The first is held mid-computation (SIGSTOP, well inside its lease) so it
    # cannot finish before the second asks.
    first = StageProcess(env, "meshhead", "--force")
    assert first.computing.wait(120)
    os.killpg(first.proc.pid, signal.SIGSTOP)
    try:
        second = StageProcess(env, "meshhead", "--force")
        assert second.wait() == EXIT_BUSY, second.stderr[-2000:]
        assert "is being computed by another run" in second.stderr, second.stderr[-2000:]
    finally:
        os.killpg(first.proc.pid, signal.SIGCONT)
    assert first.wait() == 0, first.stderr[-3000:]
    faults.append("meshhead: concurrent run")
    later = StageProcess(env, "meshhead")  # the second run's task looking again: the first run's result
    assert later.wait() == 0 and "cache hit" in later.stderr
    assert outputs(store, "meshhead") == outputs(ref, "meshhead")

    print("\n".join(faults))
    assert faults == [f"{s}: {f}" for s in STAGE_NAMES for f in ("SIGKILL #1", "SIGKILL #2", "S3 restarted")] + [
        "meshhead: concurrent run"]


def bucket_state(store: ObjectStore) -> dict[str, tuple[str, int, float]]:
    """Every object of the capture's stages: ETag, size and LastModified (a rewrite of equal bytes shows too)."""
    return {o.key: (o.etag, o.size, o.modified) for o in store.list(store.key("avatars/018"))}


@pytest.mark.parametrize("workers", [2, 1])
def test_a_run_paused_past_its_lease_changes_nothing_when_it_resumes(server: EmbeddedS3, tiny_capture: Path,
                                                                      workers: int) -> None:
    """Issue 34.5: the first run is stopped (SIGSTOP, its worker processes too) as it starts computing and
    stays stopped past its lease; a second run takes the lease over and finishes. The first, resumed,
    writes and deletes nothing and exits 75 with "lost the lock". Stage 1 writes from camera worker
    processes (workers=2) or from the stage's own process (workers=1); the fence is the same hook.

    The pause lands before the first write: a request already past the fence when the process stops
    can still land after it resumes (docs/architecture.md#leases says why S3 cannot refuse it)."""
    stage = "extract"
    env = env_for(server, f"paused-{workers}")
    store = store_for(env)
    upload_capture(store, tiny_capture)
    # Renewals every 3 s: a loaded machine's second run keeps its lease.
    lease = ["--set", "storage.lock_ttl_s=10", "--set", f"extract.workers={workers}"]
    first = StageProcess(env, stage, *lease)
    assert first.computing.wait(120), first.stderr[-3000:]
    os.killpg(first.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(13)  # past the 10 s lease on the store's clock
        second = StageProcess(env, stage, *lease)
        assert second.wait() == 0, second.stderr[-3000:]
        assert "taking over the lock" in second.stderr, second.stderr[-3000:]
        before = bucket_state(store)
        manifest = read_manifest(store, "018", stage)
    finally:
        os.killpg(first.proc.pid, signal.SIGCONT)
    assert first.wait() == 75, first.stderr[-3000:]
    assert "lost the lock" in first.stderr.strip().splitlines()[-1], first.stderr[-3000:]
    assert bucket_state(store) == before
    assert read_manifest(store, "018", stage) == manifest and done_or_absent(store, stage)


def test_scratch_disk_full(server: EmbeddedS3, tiny_capture: Path, full_scratch: Path) -> None:
    env = env_for(server, "diskfull", HEADAVATAR_SCRATCH=str(full_scratch))
    store = store_for(env)
    upload_capture(store, tiny_capture)
    run = StageProcess(env, "extract")
    assert run.wait() == 75, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 018/extract: the scratch directory") and "is full" in last, last
    assert read_manifest(store, "018", "extract") is None
    assert list(full_scratch.iterdir()) == []  # the attempt's scratch directory is gone


def in_flight(small_parts: ObjectStore, direction: str, key: str, target: Path, size: int) -> bool:
    """The transfer has begun and not ended: a multipart upload is open, a partial download is on disk."""
    if direction == "download":  # ObjectStore writes <target>.part, into which boto3 renames its own temp file
        for part in target.parent.glob(target.name + ".part*"):
            try:
                if 0 < part.stat().st_size < size:
                    return True
            except FileNotFoundError:  # renamed in between
                pass
        return False
    return bool(small_parts.client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads"))


def test_multipart_transfers_across_a_restart(server: EmbeddedS3, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(160 * 2**20))  # 32 parts: seconds to move, so the restart can land mid-way
    env = env_for(server, "transfers")
    prefix = store_for(env).key("transfers")
    key = f"{prefix}/big.bin"
    small_parts = store_for(env, "storage.multipart_threshold_mb=5", "storage.multipart_chunk_mb=5")
    for direction in ("upload", "download"):
        errors: list[BaseException] = []
        target = tmp_path / "back.bin"

        def transfer(direction: str = direction, target: Path = target, errors: list = errors) -> None:
            try:
                if direction == "upload":
                    small_parts.upload_file(big, key)
                else:
                    small_parts.download_file(key, target)
            except StorageUnavailable as e:
                errors.append(e)

        t = threading.Thread(target=transfer)
        t.start()
        deadline = time.monotonic() + 60
        caught = False
        while t.is_alive() and time.monotonic() < deadline and not caught:
            caught = in_flight(small_parts, direction, key, target, big.stat().st_size)
            time.sleep(0.005)
        # The server goes away with the transfer under way, not before it began or after it ended.
        assert caught and t.is_alive() and not target.exists(), f"the {direction} was not in flight when S3 stopped"
        server.stop()
        time.sleep(2)
        server.start()
        t.join(300)
        if errors:  # given up cleanly: redo it, as a retried task would
            assert not target.exists() or direction == "upload"
            transfer()
        small_parts.abort_multipart_uploads(prefix)  # what the next attempt of a stage does
        uploads = small_parts.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/")
        assert not uploads.get("Uploads"), uploads
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_tracking_server_down_during_training_loses_no_run(server: EmbeddedS3, reference: ObjectStore,
                                                           tmp_path: Path) -> None:
    """The stage finishes and says what was not tracked; the next run of the task logs it."""
    from mlflow.tracking import MlflowClient

    from headavatar.devserver.mlflow_server import EmbeddedMLflow

    mlflow = EmbeddedMLflow(tmp_path / "mlflow", server.env(), BUCKET)
    mlflow.start()
    try:
        env = env_for(server, "mlflow-down", MLFLOW_TRACKING_URI=mlflow.uri, HEADAVATAR_RUN_ID="faulted")
        store = store_for(env)
        copy_stages(store, reference.cfg.prefix, ("extract", "sample", "matting", "fitting"))
        run = StageProcess(env, "meshhead")
        assert run.computing.wait(120)
        mlflow.stop()
        assert run.wait() == 0, run.stderr[-3000:]
        assert "MLflow tracking at" in run.stderr and "the stage's outputs are unaffected" in run.stderr
        assert read_manifest(store, "018", "meshhead") is not None

        mlflow.start()  # back (on another port): the retried task is a cache hit and logs what was missed
        env["MLFLOW_TRACKING_URI"] = mlflow.uri
        again = StageProcess(env, "meshhead")
        assert again.wait() == 0 and "cache hit" in again.stderr and "tracked in MLflow run" in again.stderr
        client = MlflowClient(mlflow.uri)
        exp = client.get_experiment_by_name("headavatar")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`headavatar.stage` = 'meshhead'")
        assert len(runs) == 1 and runs[0].data.metrics["holdout_iou"] == read_manifest(
            store, "018", "meshhead").metrics["holdout_iou"]
    finally:
        mlflow.stop()

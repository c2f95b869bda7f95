"""Data-parallel training of one capture: N ranks share each step's views and average their gradients.

Rank 0 is the stage process itself: it loads the views, trains, and writes every output. Ranks
1..N-1 are spawned processes (``spawn``: CUDA cannot be forked) that load the same views from the
bucket, train on their share of each step, and write nothing. Every rank draws the step's views from
the same seeded sampler and keeps every N-th, so the sampler, the parameters and a checkpoint are
one for all ranks; torch's DistributedDataParallel averages the gradients (NCCL on GPUs, gloo on the
CPU), so N ranks with ``views_per_step`` views in all take the step one rank takes.

A rank does not outlive its stage: spawned ranks get SIGKILL when rank 0 dies, however it dies
(``PR_SET_PDEATHSIG``), and a rank that dies makes the others' next collective fail (gloo at once,
NCCL after :data:`TIMEOUT`), so the stage exits and its retry resumes from the last checkpoint.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from headavatar.contract.manifest import Manifest
    from headavatar.contract.stage import StageContext
    from headavatar.settings import PipelineConfig

log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a rank (a checkpoint upload is shorter)
T = TypeVar("T")


@dataclass(frozen=True)
class RankJob:
    """What a spawned rank needs to rebuild rank 0's inputs (picklable: no clients, no open files)."""

    stage: str
    capture: str
    config: PipelineConfig
    upstream: dict[str, Manifest]
    inputs: dict[str, str]
    scratch: Path
    world: int
    start: Path | None  # the checkpoint rank 0 resumes from, saved for the others (None: from step 0)
    lpips_path: Path | None  # the LPIPS weights rank 0 fetched (None: without)

    @property
    def rendezvous(self) -> Path:
        return self.scratch / "ranks.rendezvous"


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) outside data-parallel training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world-th, starting at its rank."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def gather(mine: list[T]) -> list[T]:
    """The inverse of :func:`shard`: every rank's share, back in the original order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return mine
    shares: list[list[T] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    out: list[T] = []
    for i in range(max(len(s or []) for s in shares)):
        out += [s[i] for s in shares if s is not None and i < len(s)]
    return out


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each (scalar) tensor averaged over the ranks: the step's loss terms over all its views."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)  # gloo has no AVG
    return dict(zip(values, (stacked / world).unbind(), strict=True))


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r trains on GPU r of those the process sees (its leases: ``CUDA_VISIBLE_DEVICES``), or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def join(rank: int, job: RankJob, device: torch.device) -> None:
    """Enter the process group (waits until every rank has). On the CPU the ranks share its cores."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // job.world))
    (job.scratch / f"rank-{rank}.ready").touch()  # rank 0 waits for these, watching for a rank that died first
    dist.init_process_group(backend, init_method=f"file://{job.rendezvous}", rank=rank, world_size=job.world,
                            timeout=TIMEOUT)
    log.info("%s/%s: rank %d of %d joined (%s on %s)", job.capture, job.stage, rank, job.world, backend, device)


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def ranks(job: RankJob, target: Callable[[int, RankJob], None], device: torch.device) -> Iterator[None]:
    """This process as rank 0 of ``job.world`` for the ``with`` block; ranks 1.. spawned, each running
    ``target(rank, job)`` (a module-level function that calls :func:`join`). A rank that dies before
    joining fails the block at once; one that dies later fails the next collective (gloo at once, NCCL
    after :data:`TIMEOUT`) and is named in the log as it dies. The block's end waits for the ranks (a
    rank that failed fails it); a block that fails kills them."""
    for stale in (job.rendezvous, *job.scratch.glob("rank-*.ready")):  # left by an earlier attempt
        stale.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_rank_main, args=(target, rank, job), name=f"{job.stage} rank {rank}", daemon=True)
             for rank in range(1, job.world)]
    for p in procs:
        p.start()
    done = threading.Event()
    try:
        _await_ranks(job, procs)
        threading.Thread(target=_report_deaths, args=(procs, done), daemon=True).start()
        join(0, job, device)
        yield
        leave()
        done.set()
        for p in procs:
            p.join(TIMEOUT.total_seconds())
        failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"data-parallel training: {', '.join(failed)} failed")
    finally:
        done.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        leave()
        torch.set_num_threads(threads)


def _await_ranks(job: RankJob, procs: list[multiprocessing.process.BaseProcess]) -> None:
    """Until every spawned rank is about to join: a rank that exits first (an import error, no GPU) is
    reported at once instead of after the group's timeout."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while not all((job.scratch / f"rank-{r}.ready").exists() for r in range(1, job.world)):
        dead = [f"{p.name} exited with {p.exitcode}" for p in procs if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"data-parallel training: {', '.join(dead)} before joining (its error is above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"data-parallel training: ranks not ready after {TIMEOUT}")
        time.sleep(0.2)


def _report_deaths(procs: list[multiprocessing.process.BaseProcess], done: threading.Event) -> None:
    """Name a rank that dies during training in the log as it happens (rank 0 learns it at its next collective)."""
    waiting = {p.sentinel: p for p in procs}
    while waiting and not done.is_set():
        for sentinel in multiprocessing.connection.wait(list(waiting), timeout=1.0):
            p = waiting.pop(sentinel)  # type: ignore[call-overload]
            if p.exitcode != 0 and not done.is_set():  # exitcode reaps it; the block joins it again, harmlessly
                log.error("%s exited with %s during training: the stage fails at its next collective", p.name,
                          p.exitcode)


def _rank_main(target: Callable[[int, RankJob], None], rank: int, job: RankJob) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        target(rank, job)
    finally:
        leave()


def _die_with_parent() -> None:
    """SIGKILL when the process that spawned this one dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        log.warning("prctl unavailable: this rank may outlive its stage if the stage is killed")
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the signal was asked for
        os._exit(1)


def rank_context(job: RankJob) -> StageContext:
    """A spawned rank's read-only view of the stage: the same config, upstream manifests and inputs as
    rank 0, its own bucket client; no output writer (a rank writes nothing)."""
    from headavatar.contract.stage import StageContext
    from headavatar.storage import ObjectStore

    store = ObjectStore(job.config.storage)
    out: Any = None
    return StageContext(job.stage, job.capture, job.config, store, job.scratch, job.upstream, job.inputs, out)

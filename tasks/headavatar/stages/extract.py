"""Stage 1: frames from the 16 synchronized videos, cropped and resized (GHA layout).

Speed comes from doing only necessary work: each video is decoded once, videos run in parallel
processes (forked from a server that imports their modules while the cache check, the lease and
the header reads run), frames nothing needs and nothing references are skipped inside the
decoder, which is flushed as soon as the last wanted frame is in (:mod:`headavatar.video`), and
only the extracted frames that stage 2 will keep (every ``sample.frame_stride``-th of every
``extract.frame_stride``-th video frame) are converted, cropped, encoded and uploaded. The frame
index (``frames.json``) still records every extracted frame, so stage 2 selects by index and
copies server-side. Peak memory per worker is one decoded frame, its crop and the bounded upload
queue: it does not grow with the number of frames (``worker_peak_rss_mb`` in the manifest).

Scratch does not grow with the capture either: the frame plan needs only every video's header,
read from S3 with ranged reads; a job is one camera's video of one sequence, fetched just before a
worker takes it, at most ``workers + extract.prefetch_videos`` at once, and deleted when it ends
(:class:`ScratchWindow`; the bound and the peak are in the manifest metrics). The first failing
job cancels the others and kills the running workers (:func:`run_jobs`): a bad video fails the run
at once, not after every other camera was decoded and uploaded.

A NeRSemble v2 capture with ``color_calibration.json`` has each camera's colour correction applied
(``extract.color_correction``, on by default) to every written frame and background plate, on the
source pixels the crop keeps, before the resize: the same pixels as correcting whole frames first
(the dataset's order), for ~70 ms of CPU per 2200x3208 frame (:mod:`headavatar.color`). The raw
layout and whether colours were corrected are in ``frames.json`` and the manifest metrics. A v2
capture without ``color_calibration.json`` is refused unless ``extract.color_correction`` is off.

Videos and plates are read through ``headavatar validate``'s own functions (:mod:`headavatar.raw_media`),
so stage 1 refuses what validate refuses, with the same line; videos of another frame size than the
calibration's (:meth:`headavatar.raw.CameraParams.frame_size`) are refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from multiprocessing import forkserver
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from headavatar.color import ColorCorrection
from headavatar.contract.lock import StageLock, shared_fence
from headavatar.contract.manifest import FileEntry
from headavatar.contract.outputs import OutputWriter
from headavatar.contract.stage import Stage, StageContext
from headavatar.contract.usage import WORKER_CPU_METRIC
from headavatar.errors import RawCaptureError
from headavatar.imaging import CropResize, encode_jpg, npz_bytes
from headavatar.layout import FRAMES_INDEX
from headavatar.raw import RawCapture, Sequence, VideoInfo, discover, frame_size_problem
from headavatar.raw_media import decode_plate, probe_remote_video
from headavatar.settings import PipelineConfig, StorageConfig
from headavatar.storage import ObjectInfo, ObjectStore, gather
from headavatar.video import decode_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequencePlan:
    name: str
    part: int
    video_frames: int  # usable frames (the shortest camera's count)
    first_extracted: int  # global index of this sequence's first extracted frame

    @property
    def label(self) -> str:
        return f"{self.name}_part-{self.part}"

    def extracted(self, stride: int) -> int:
        return -(-self.video_frames // stride)


@dataclass(frozen=True)
class FramePlan:
    """Which video frame becomes which extracted frame, and which of those are written."""

    sequences: tuple[SequencePlan, ...]
    extract_stride: int
    sample_stride: int

    @property
    def total_extracted(self) -> int:
        last = self.sequences[-1]
        return last.first_extracted + last.extracted(self.extract_stride)

    def written(self, seq: SequencePlan) -> dict[int, int]:
        """video frame -> extracted index, for the frames of ``seq`` that stage 2 keeps."""
        out = {}
        for k in range(0, seq.video_frames, self.extract_stride):
            e = seq.first_extracted + k // self.extract_stride
            if e % self.sample_stride == 0:
                out[k] = e
        return out

    def to_json(self) -> dict:
        return {
            "extract_stride": self.extract_stride,
            "sample_stride": self.sample_stride,
            "total_extracted": self.total_extracted,
            "sequences": [
                {"name": s.name, "part": s.part, "video_frames": s.video_frames,
                 "first_extracted": s.first_extracted, "extracted": s.extracted(self.extract_stride)}
                for s in self.sequences
            ],
            "written": [
                {"index": e, "sequence": s.label, "video_frame": k}
                for s in self.sequences for k, e in self.written(s).items()
            ],
        }


def plan_frames(raw: RawCapture, infos: dict[tuple[str, str], VideoInfo], extract_stride: int,
                sample_stride: int) -> FramePlan:
    """Concatenate sequences in sorted order; a sequence is as long as its shortest video."""
    plans, offset = [], 0
    for seq in raw.sequences:
        counts = {cam: infos[(seq.label, cam)].frames for cam in raw.cameras}
        n = min(counts.values())
        if max(counts.values()) != n:
            short = sorted(c for c, k in counts.items() if k == n)
            log.warning("sequence %s: camera(s) %s have only %d frames (others up to %d); "
                        "using the first %d frames of every camera", seq.label, ", ".join(short), n,
                        max(counts.values()), n)
        plans.append(SequencePlan(seq.name, seq.part, n, offset))
        offset += -(-n // extract_stride)
    return FramePlan(tuple(plans), extract_stride, sample_stride)


@dataclass(frozen=True)
class CameraJob:
    """One camera's video of one sequence: the unit of work and of scratch space (fetched just
    before a worker takes it, deleted when it is done)."""

    camera: str
    sequence: str  # label
    video: str  # local path
    keep: dict[int, int]  # video frame -> extracted index, for the frames to write
    background: str | None  # local path of the camera's plate, in the camera's first job only
    storage: StorageConfig
    prefix: str
    crop: CropResize
    intrinsic: np.ndarray
    extrinsic: np.ndarray
    jpeg_quality: int
    visible: bytes  # the same for every camera (all videos share a resolution): encoded once
    visible_lowres: bytes
    color: ColorCorrection | None = None  # v2 colour calibration of this camera (frames and plate)
    background_name: str = ""  # the plate's object (s3://...), for errors
    frame_size: tuple[int, int] | None = None  # the videos' (width, height): the plate must have it


@dataclass(frozen=True)
class CameraResult:
    camera: str
    sequence: str
    entries: dict[str, FileEntry]
    decoded: int
    written: int
    seconds: float
    peak_rss_mb: float  # of the worker process so far: flat in the number of frames
    cpu_s: float  # CPU time of this job in its worker (all threads): the runner cannot see forked-server workers


def extract_camera(job: CameraJob) -> CameraResult:
    """Decode one video once; crop, encode and upload the frames to keep (and the camera's plate)."""
    t0, cpu0 = time.monotonic(), time.process_time()
    shared = _worker_store  # made by the pool's initializer from this job's storage config
    store = shared or ObjectStore(job.storage)
    if shared is None:
        store.fence_with(_inline_fence)
    out = OutputWriter(store, job.prefix)
    cam, q = job.camera, job.jpeg_quality
    try:
        if job.background is not None:
            bg = decode_plate(Path(job.background).read_bytes(), job.background_name or f"background plate of "
                              f"camera {cam}", job.frame_size)  # the same decode as validate's
            out.put_bytes(f"background/image_{cam}.jpg", encode_jpg(job.crop.apply(bg, job.color), q))
        camera_npz = npz_bytes(extrinsic=job.extrinsic, intrinsic=job.crop.intrinsic(job.intrinsic))
        written = 0
        stats = {"decoded": 0}
        for k, frame in decode_frames(job.video, set(job.keep), f"{job.sequence}/cam_{cam}.mp4", stats):
            folder = f"{job.keep[k]:04d}"
            img = job.crop.apply(frame, job.color)
            out.put_bytes(f"images/{folder}/image_{cam}.jpg", encode_jpg(img, q))
            out.put_bytes(f"images/{folder}/image_lowres_{cam}.jpg", encode_jpg(job.crop.lowres(img), q))
            out.put_bytes(f"images/{folder}/visible_{cam}.jpg", job.visible)
            out.put_bytes(f"images/{folder}/visible_lowres_{cam}.jpg", job.visible_lowres)
            out.put_bytes(f"cameras/{folder}/camera_{cam}.npz", camera_npz)
            written += 1
        out.wait()
        log.info("camera %s: %s decoded, %d frames written", cam, job.sequence, written)
    finally:
        if shared is None:
            store.close()
    return CameraResult(cam, job.sequence, out.entries, stats["decoded"], written, time.monotonic() - t0,
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.process_time() - cpu0)


class ScratchWindow:
    """The raw files of at most ``window`` jobs on scratch at once, each fetched just before a worker
    needs it and deleted when its job ends: scratch stays bounded whatever the capture's size.

    ``peak_bytes`` is the most that was held (object sizes, partial downloads included).
    """

    def __init__(self, store: ObjectStore, window: int) -> None:
        self.store, self.window = store, window
        self._futures: dict[object, Future] = {}
        self._held: dict[object, tuple[list[Path], int]] = {}
        self.peak_bytes = 0

    def fetch(self, key: object, objects: list[tuple[ObjectInfo, Path]]) -> Future:
        """Start downloading one job's objects (once per key); refuses to exceed the window."""
        if key in self._futures:
            return self._futures[key]
        if len(self._held) >= self.window:
            raise RuntimeError(f"scratch window of {self.window} jobs exceeded")  # a bug, never a capture's fault
        self._held[key] = ([p for _, p in objects], sum(o.size for o, _ in objects))
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self._held.values()))
        fut = self.store.pool.submit(lambda: [self.store.download_file(o.key, p) for o, p in objects])
        self._futures[key] = fut
        return fut

    def release(self, key: object) -> None:
        """Delete a finished job's files, making room for the next fetch."""
        self._futures.pop(key, None)
        for path in self._held.pop(key, ([], 0))[0]:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Cancel fetches not started and wait for those under way: nothing may write into scratch
        once it is removed."""
        for f in self._futures.values():
            f.cancel()
        wait(self._futures.values())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def worker_count(configured: int) -> int:
    return configured or cpu_count()


class Extract(Stage):
    name = "extract"
    inputs = ("raw",)
    config_sections = ("capture", "extract", "sample")
    code_version = 2  # bump when outputs change (docs/caching.md); 2: .npz bytes independent of the Python release

    def __init__(self) -> None:
        self._raw: RawCapture | None = None

    def prepare(self, config: PipelineConfig) -> None:
        if worker_count(config.extract.workers) > 1:
            start_worker_server()

    def raw_inputs(self, store: ObjectStore, capture: str, config: PipelineConfig) -> dict[str, str]:
        self._raw = discover(store, capture, config)
        return {"raw": self._raw.digest()}

    def run(self, ctx: StageContext) -> None:
        cfg, store = ctx.config.extract, ctx.store
        raw = self._raw or discover(store, ctx.capture, ctx.config)
        workers = min(worker_count(cfg.workers), len(raw.cameras))
        # Jobs in order, one per (sequence, camera); the first ones are fetched while the videos'
        # headers are read (ranged reads, nothing downloaded) and the camera workers start.
        order = [(s, cam) for s in raw.sequences for cam in raw.cameras]
        scratch = ScratchWindow(store, workers + cfg.prefetch_videos)
        try:
            for seq, cam in order[:scratch.window]:
                self._fetch(ctx, raw, scratch, seq, cam)
            log.info("%s: reading %d video headers", ctx.capture, len(order))
            probing = store.submit_all(lambda o: _probe(store, o), [seq.videos[cam] for seq, cam in order])
            with worker_pool(workers, store.cfg, ctx.lease) as pool:
                infos = dict(zip([(s.label, cam) for s, cam in order], gather(probing), strict=True))
                self._extract(ctx, raw, infos, scratch, pool, workers)
        finally:
            scratch.close()

    def _fetch(self, ctx: StageContext, raw: RawCapture, scratch: ScratchWindow, seq: Sequence, cam: str) -> Future:
        """One job's video, and the camera's plate with its first sequence, into scratch."""
        objects = [(seq.videos[cam], self._video_path(ctx, seq, cam))]
        if seq is raw.sequences[0]:
            objects.append((raw.backgrounds[cam], self._plate(ctx, cam)))
        return scratch.fetch((seq.label, cam), objects)

    @staticmethod
    def _video_path(ctx: StageContext, seq: Sequence, cam: str) -> Path:
        return ctx.scratch / "videos" / seq.label / f"cam_{cam}.mp4"

    @staticmethod
    def _plate(ctx: StageContext, cam: str) -> Path:
        return ctx.scratch / "background" / f"image_{cam}.jpg"

    def _extract(self, ctx: StageContext, raw: RawCapture, infos: dict[tuple[str, str], VideoInfo],
                 scratch: ScratchWindow, pool: ProcessPoolExecutor | None, workers: int) -> None:
        """Check every video, plan the frames, then extract the videos in parallel."""
        cfg, store = ctx.config.extract, ctx.store
        keys = {(s.label, cam): o.key for s in raw.sequences for cam, o in s.videos.items()}
        counts = Counter((i.width, i.height) for i in infos.values())
        if len(counts) > 1:
            (w, h), _ = counts.most_common(1)[0]
            odd = [f"{store.uri(keys[k])} is {i.width}x{i.height}" for k, i in sorted(infos.items())
                   if (i.width, i.height) != (w, h)]
            raise RawCaptureError(f"capture {ctx.capture}: videos differ in resolution: {'; '.join(odd[:4])}"
                                  f"{' ...' if len(odd) > 4 else ''} (the others are {w}x{h})")
        sizes = set(counts)
        (width, height), = sizes
        first_video = raw.sequences[0].videos[raw.cameras[0]]
        problem = frame_size_problem(raw.camera_params, width, height, store.uri(first_video.key),
                                     store.uri(raw.params_object.key))
        if problem:
            raise RawCaptureError(problem)
        correct = cfg.color_correction and raw.color_matrices is not None
        if raw.color_matrices is not None and not correct:
            log.info("%s: extract.color_correction is off: color_calibration.json is not applied", ctx.capture)

        plan = plan_frames(raw, infos, cfg.frame_stride, ctx.config.sample.frame_stride)
        crop = CropResize.from_config(cfg)
        visible = crop.visible(height, width)
        visible_jpg = encode_jpg(visible, cfg.jpeg_quality)
        visible_lowres_jpg = encode_jpg(crop.lowres(visible), cfg.jpeg_quality)
        colors = {cam: ColorCorrection(raw.color_matrices[cam]) for cam in raw.cameras} if correct else {}
        first = raw.sequences[0].label
        written = {s.label: plan.written(s) for s in plan.sequences}
        jobs = [
            CameraJob(
                camera=cam, sequence=seq.label, video=str(self._video_path(ctx, seq, cam)), keep=written[seq.label],
                background=str(self._plate(ctx, cam)) if seq.label == first else None,
                storage=store.cfg, prefix=ctx.outputs.prefix, crop=crop,
                intrinsic=raw.camera_params.intrinsic, extrinsic=raw.camera_params.world_to_cam[cam][:3],
                jpeg_quality=cfg.jpeg_quality, visible=visible_jpg, visible_lowres=visible_lowres_jpg,
                color=colors.get(cam), background_name=store.uri(raw.backgrounds[cam].key), frame_size=(width, height),
            )
            for seq in raw.sequences for cam in raw.cameras
        ]
        by_label = {s.label: s for s in raw.sequences}
        largest = (max(o.size for s in raw.sequences for o in s.videos.values())
                   + max(o.size for o in raw.backgrounds.values()))
        log.info("%s: %d sequence(s), %d of %d extracted frames to write; %d videos on %d worker(s), "
                 "at most %d on scratch", ctx.capture, len(plan.sequences), sum(map(len, written.values())),
                 plan.total_extracted, len(jobs), workers, scratch.window)
        results = run_jobs(pool, extract_camera, jobs, f"extract {ctx.capture}",
                           fetch=lambda j: self._fetch(ctx, raw, scratch, by_label[j.sequence], j.camera),
                           release=lambda j: scratch.release((j.sequence, j.camera)), window=scratch.window)
        for r in results:
            for rel, entry in r.entries.items():
                ctx.outputs.record(rel, entry)
        index = {"raw_layout": raw.layout, "color_corrected": bool(correct), **plan.to_json()}
        ctx.outputs.put_bytes(FRAMES_INDEX, json.dumps(index, indent=1).encode())
        ctx.metrics.update({
            "raw_layout_version": float(raw.layout.lstrip("v")),  # 1 or 2: the NeRSemble raw layout found
            "color_corrected": float(correct),
            "cameras": len(raw.cameras),
            "sequences": len(plan.sequences),
            "video_frames_decoded": sum(r.decoded for r in results),
            "extracted_frames": plan.total_extracted,
            "frames_written": sum(len(plan.written(s)) for s in plan.sequences),
            "images_written": sum(r.written for r in results),
            "worker_peak_rss_mb": round(max(r.peak_rss_mb for r in results), 1),
            WORKER_CPU_METRIC: round(sum(r.cpu_s for r in results), 2),
            # Raw files held on scratch at most, and the bound: (workers + prefetch_videos) x
            # (largest video + largest plate), whatever the number of sequences and cameras.
            "raw_scratch_peak_mb": round(scratch.peak_bytes / 2**20, 2),
            "raw_scratch_bound_mb": round(scratch.window * largest / 2**20, 2),
        })


def _probe(store: ObjectStore, obj: ObjectInfo) -> VideoInfo:
    """A video's header facts from S3 (ranged reads), by ``validate``'s own probe: the first frame
    decodes and the last frame's data is there and whole, or a one-line error naming the video."""
    facts = probe_remote_video(store, obj)
    return VideoInfo(facts.frames, facts.width, facts.height)


_worker_store: ObjectStore | None = None  # one per camera worker process, made by _init_worker
_inline_fence: Callable[[], None] | None = None  # the stage's lease fence, for jobs run without workers


def _init_worker(level: int, storage: StorageConfig, environ: dict[str, str], cv_threads: int,
                 lease: tuple | None) -> None:
    """Make the S3 client (about 0.1 s of CPU) while the parent downloads, fenced by the stage's lease.

    A forkserver child inherits the server's environment, frozen when the server started;
    the caller's current one (credentials included) is what this run must use.
    """
    global _worker_store
    os.environ.clear()
    os.environ.update(environ)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cv2.setNumThreads(cv_threads)  # cameras are the parallelism: OpenCV gets only the cores left over
    _worker_store = ObjectStore(storage)
    if lease is not None:
        _worker_store.fence_with(partial(shared_fence, lease))


def start_worker_server() -> multiprocessing.context.ForkServerContext:
    """Start the server that camera workers fork from, if it is not running (it does not block)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "av"])
    forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def worker_pool(workers: int, storage: StorageConfig,
                lease: StageLock | None = None) -> Iterator[ProcessPoolExecutor | None]:
    """Camera worker processes, forked from a clean single-threaded server that has imported them.

    Not forked from this process, which holds S3 transfer and lease threads. Not spawned either:
    every spawned worker imports numpy, OpenCV, PyAV and boto3 again (about 0.6 s of CPU each).
    Their writes are fenced by ``lease``, as this process's are.
    """
    global _inline_fence
    if workers <= 1:
        _inline_fence = lease.fence if lease is not None else None
        try:
            yield None
        finally:
            _inline_fence = None
        return
    ctx = start_worker_server()
    level = logging.getLogger().getEffectiveLevel()
    shared = lease.share() if lease is not None else None
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(level, storage, dict(os.environ), max(1, cpu_count() // workers),
                                       shared)) as pool:
        for _ in range(workers):
            pool.submit(int)  # start every worker now
        yield pool


def run_jobs(pool: ProcessPoolExecutor | None, fn: Callable, jobs: list, desc: str, *,
             fetch: Callable[[object], Future] | None = None, release: Callable[[object], None] | None = None,
             window: int = 0) -> list:
    """Run jobs on the pool (inline without one) with a progress bar; results in job order.

    ``fetch(job)`` starts getting a job's inputs; a job is submitted once they are in, at most
    ``window`` jobs (0: all) are being fetched or run at once, and ``release(job)`` frees a job's
    inputs when it ends. The first error (a bad video, a failed download) cancels the jobs not
    started and kills the running workers at once: a failing run does not decode and upload the
    other cameras' frames first.
    """
    todo = deque(range(len(jobs)))
    fetching: dict[Future, int] = {}
    running: dict[Future, int] = {}
    results: dict[int, object] = {}
    limit = window or len(jobs)
    try:
        with tqdm(total=len(jobs), desc=desc, unit="video") as bar:
            while todo or fetching or running:
                while todo and len(fetching) + len(running) < limit:
                    i = todo.popleft()
                    fetching[fetch(jobs[i]) if fetch else _completed(None)] = i
                done, _ = wait([*fetching, *running], return_when=FIRST_COMPLETED)
                # Finished fetches first, in job order (jobs start in order when their inputs are in).
                for f in sorted(done, key=lambda f: (f in running, fetching.get(f, 0))):
                    if f in fetching:
                        i = fetching.pop(f)
                        f.result()
                        running[pool.submit(fn, jobs[i]) if pool else _call(fn, jobs[i])] = i
                    else:
                        i = running.pop(f)
                        if release:
                            release(jobs[i])
                        results[i] = f.result()
                        bar.update()
    except BaseException:
        for f in (*fetching, *running):
            f.cancel()
        if pool is not None:
            stop_workers(pool)
        wait(fetching)  # downloads under way end before the caller removes scratch
        raise
    return [results[i] for i in range(len(jobs))]


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and kill the workers now (their partial uploads never become objects)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            proc.kill()


def _completed(value: object) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _call(fn: Callable, job: object) -> Future:
    """``fn(job)`` here and now, as a finished future (the inline path of :func:`run_jobs`)."""
    f: Future = Future()
    try:
        f.set_result(fn(job))
    except Exception as e:  # re-raised by the caller, through the future
        f.set_exception(e)
    return f

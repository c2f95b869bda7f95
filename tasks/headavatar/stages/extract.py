"""Stage 1: frames from the 16 synchronized videos, cropped and resized (GHA layout).

Speed comes from doing only necessary work: each video is decoded once, cameras run in parallel
processes (forked from a server that imports their modules while the cache check, the lease and
the raw download run), frames nothing needs and nothing references are skipped inside the
decoder, which is flushed as soon as the last wanted frame is in (:mod:`headavatar.video`), and
only the extracted frames that stage 2 will keep (every ``sample.frame_stride``-th of every
``extract.frame_stride``-th video frame) are converted, cropped, encoded and uploaded. The frame
index (``frames.json``) still records every extracted frame, so stage 2 selects by index and
copies server-side. Peak memory per worker is one decoded frame, its crop and the bounded upload
queue: it does not grow with the number of frames (``worker_peak_rss_mb`` in the manifest).

A NeRSemble v2 capture with ``color_calibration.json`` has each camera's colour correction applied
(``extract.color_correction``, on by default) to every written frame and background plate, on the
source pixels the crop keeps, before the resize: the same pixels as correcting whole frames first
(the dataset's order), for ~70 ms of CPU per 2200x3208 frame (:mod:`headavatar.color`). The raw
layout and whether colours were corrected are in ``frames.json`` and the manifest metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from headavatar.color import ColorCorrection
from headavatar.contract.manifest import FileEntry
from headavatar.contract.outputs import OutputWriter
from headavatar.contract.stage import Stage, StageContext
from headavatar.contract.usage import WORKER_CPU_METRIC
from headavatar.errors import RawCaptureError
from headavatar.imaging import CropResize, encode_jpg, npz_bytes
from headavatar.layout import FRAMES_INDEX
from headavatar.raw import RawCapture, VideoInfo, discover, probe_video
from headavatar.settings import PipelineConfig, StorageConfig
from headavatar.storage import ObjectStore, gather
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
    camera: str
    storage: StorageConfig
    prefix: str
    videos: tuple[tuple[str, str, dict[int, int]], ...]  # (sequence, local path, video frame -> index)
    background: str  # local path
    crop: CropResize
    intrinsic: np.ndarray
    extrinsic: np.ndarray
    jpeg_quality: int
    visible: bytes  # the same for every camera (all videos share a resolution): encoded once
    visible_lowres: bytes
    color: ColorCorrection | None = None  # v2 colour calibration of this camera (frames and plate)


@dataclass(frozen=True)
class CameraResult:
    camera: str
    entries: dict[str, FileEntry]
    decoded: int
    written: int
    seconds: float
    peak_rss_mb: float  # of the worker process so far: flat in the number of frames
    cpu_s: float  # CPU time of this job in its worker (all threads): the runner cannot see forked-server workers


def extract_camera(job: CameraJob) -> CameraResult:
    """Decode every video of one camera once; crop, encode and upload the frames to keep."""
    t0, cpu0 = time.monotonic(), time.process_time()
    shared = _worker_store  # made by the pool's initializer from this job's storage config
    store = shared or ObjectStore(job.storage)
    out = OutputWriter(store, job.prefix)
    cam, q = job.camera, job.jpeg_quality
    try:
        bg = cv2.imread(job.background, cv2.IMREAD_COLOR)
        if bg is None:
            raise RawCaptureError(f"background plate of camera {cam}: not a decodable image")
        out.put_bytes(f"background/image_{cam}.jpg", encode_jpg(job.crop.apply(bg, job.color), q))
        camera_npz = npz_bytes(extrinsic=job.extrinsic, intrinsic=job.crop.intrinsic(job.intrinsic))
        written = 0
        stats = {"decoded": 0}
        for seq, path, keep in job.videos:
            for k, frame in decode_frames(path, set(keep), f"{seq}/cam_{cam}.mp4", stats):
                folder = f"{keep[k]:04d}"
                img = job.crop.apply(frame, job.color)
                out.put_bytes(f"images/{folder}/image_{cam}.jpg", encode_jpg(img, q))
                out.put_bytes(f"images/{folder}/image_lowres_{cam}.jpg", encode_jpg(job.crop.lowres(img), q))
                out.put_bytes(f"images/{folder}/visible_{cam}.jpg", job.visible)
                out.put_bytes(f"images/{folder}/visible_lowres_{cam}.jpg", job.visible_lowres)
                out.put_bytes(f"cameras/{folder}/camera_{cam}.npz", camera_npz)
                written += 1
            log.info("camera %s: %s decoded, %d frames written so far", cam, seq, written)
        out.wait()
    finally:
        if shared is None:
            store.close()
    return CameraResult(cam, out.entries, stats["decoded"], written, time.monotonic() - t0,
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.process_time() - cpu0)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def worker_count(configured: int) -> int:
    return configured or cpu_count()


class Extract(Stage):
    name = "extract"
    inputs = ("raw",)
    config_sections = ("capture", "extract", "sample")
    code_version = 1  # bump when a change makes this stage's outputs differ (docs/caching.md)

    def __init__(self) -> None:
        self._raw: RawCapture | None = None

    def prepare(self, config: PipelineConfig) -> None:
        if worker_count(config.extract.workers) > 1:
            start_worker_server()

    def raw_inputs(self, store: ObjectStore, capture: str, config: PipelineConfig) -> dict[str, str]:
        self._raw = discover(store, capture, config)
        return {"raw": self._raw.digest()}

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.extract
        raw = self._raw or discover(ctx.store, ctx.capture, ctx.config)
        # Fetch every video and plate concurrently while the camera workers start.
        local = {(s.label, cam): ctx.scratch / "videos" / s.label / f"cam_{cam}.mp4"
                 for s in raw.sequences for cam in s.videos}
        pairs = [(o.key, local[(s.label, cam)]) for s in raw.sequences for cam, o in s.videos.items()]
        pairs += [(o.key, self._plate(ctx, cam)) for cam, o in raw.backgrounds.items()]
        log.info("%s: fetching %d raw objects", ctx.capture, len(pairs))
        fetching = ctx.store.submit_all(ctx.store.download_file, *zip(*pairs, strict=True))
        try:
            workers = min(worker_count(cfg.workers), len(raw.cameras))
            with worker_pool(workers, ctx.store.cfg) as pool:
                gather(fetching)
                self._extract(ctx, raw, local, pool, workers)
        finally:
            wait(fetching)  # nothing may still write into scratch when it is removed

    @staticmethod
    def _plate(ctx: StageContext, cam: str) -> Path:
        return ctx.scratch / "background" / f"image_{cam}.jpg"

    def _extract(self, ctx: StageContext, raw: RawCapture, local: dict[tuple[str, str], Path],
                 pool: ProcessPoolExecutor | None, workers: int) -> None:
        """Check every video, plan the frames, then extract the cameras in parallel."""
        cfg, store = ctx.config.extract, ctx.store
        keys = {(s.label, cam): o.key for s in raw.sequences for cam, o in s.videos.items()}
        infos = {k: probe_video(p, store.uri(keys[k])) for k, p in local.items()}
        counts = Counter((i.width, i.height) for i in infos.values())
        if len(counts) > 1:
            (w, h), _ = counts.most_common(1)[0]
            odd = [f"{store.uri(keys[k])} is {i.width}x{i.height}" for k, i in sorted(infos.items())
                   if (i.width, i.height) != (w, h)]
            raise RawCaptureError(f"capture {ctx.capture}: videos differ in resolution: {'; '.join(odd[:4])}"
                                  f"{' ...' if len(odd) > 4 else ''} (the others are {w}x{h})")
        sizes = set(counts)
        correct = cfg.color_correction and raw.color_matrices is not None
        if raw.color_matrices is not None and not correct:
            log.info("%s: extract.color_correction is off: color_calibration.json is not applied", ctx.capture)

        plan = plan_frames(raw, infos, cfg.frame_stride, ctx.config.sample.frame_stride)
        crop = CropResize.from_config(cfg)
        (width, height), = sizes
        visible = crop.visible(height, width)
        visible_jpg = encode_jpg(visible, cfg.jpeg_quality)
        visible_lowres_jpg = encode_jpg(crop.lowres(visible), cfg.jpeg_quality)
        jobs = [
            CameraJob(
                camera=cam, storage=store.cfg, prefix=ctx.outputs.prefix,
                videos=tuple((s.label, str(local[(s.label, cam)]), plan.written(s)) for s in plan.sequences),
                background=str(self._plate(ctx, cam)), crop=crop,
                intrinsic=raw.camera_params.intrinsic, extrinsic=raw.camera_params.world_to_cam[cam][:3],
                jpeg_quality=cfg.jpeg_quality, visible=visible_jpg, visible_lowres=visible_lowres_jpg,
                color=ColorCorrection(raw.color_matrices[cam]) if correct else None,
            )
            for cam in raw.cameras
        ]
        log.info("%s: %d sequence(s), %d of %d extracted frames to write; %d cameras on %d worker(s)", ctx.capture,
                 len(plan.sequences), sum(len(plan.written(s)) for s in plan.sequences), plan.total_extracted,
                 len(jobs), workers)
        results = run_jobs(pool, extract_camera, jobs, f"extract {ctx.capture}")
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
        })


_worker_store: ObjectStore | None = None  # one per camera worker process, made by _init_worker


def _init_worker(level: int, storage: StorageConfig, environ: dict[str, str], cv_threads: int) -> None:
    """Make the S3 client (about 0.1 s of CPU) while the parent downloads.

    A forkserver child inherits the server's environment, frozen when the server started;
    the caller's current one (credentials included) is what this run must use.
    """
    global _worker_store
    os.environ.clear()
    os.environ.update(environ)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cv2.setNumThreads(cv_threads)  # cameras are the parallelism: OpenCV gets only the cores left over
    _worker_store = ObjectStore(storage)


def start_worker_server() -> multiprocessing.context.ForkServerContext:
    """Start the server that camera workers fork from, if it is not running (it does not block)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "av"])
    forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def worker_pool(workers: int, storage: StorageConfig) -> Iterator[ProcessPoolExecutor | None]:
    """Camera worker processes, forked from a clean single-threaded server that has imported them.

    Not forked from this process, which holds S3 transfer and lease threads. Not spawned either:
    every spawned worker imports numpy, OpenCV, PyAV and boto3 again (about 0.6 s of CPU each).
    """
    if workers <= 1:
        yield None
        return
    ctx = start_worker_server()
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(level, storage, dict(os.environ), max(1, cpu_count() // workers))) as pool:
        for _ in range(workers):
            pool.submit(int)  # start every worker now
        yield pool


def run_jobs(pool: ProcessPoolExecutor | None, fn, jobs: list, desc: str) -> list:
    """Run per-camera jobs on the pool (or inline without one) with a progress bar."""
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="camera") as bar:
        if pool is None:
            for job in jobs:
                results.append(fn(job))
                bar.update()
        else:
            for fut in as_completed([pool.submit(fn, j) for j in jobs]):
                results.append(fut.result())
                bar.update()
    return sorted(results, key=lambda r: r.camera)

"""Stage 3: an alpha matte per kept frame and camera, from the camera's background plate.

Writes ``images/<NNNN>/mask_<cam>.jpg`` (full size) and ``mask_lowres_<cam>.jpg`` (the names the
training stages read), and ``overlays/<NNNN>.jpg`` contact sheets (matte over image, all cameras)
for people to look at. Methods (``matting.method``): ``bmv2`` — BackgroundMattingV2
MattingRefine, batched on the GPU, weights from ``matting.weights`` (checked before any frame is
read); ``classical`` — background difference + guided filter, no weights. On synthetic captures
the matte is scored against the ground-truth alpha (IoU of the mask thresholded at 0.5).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from headavatar.assets import asset_identity
from headavatar.contract.manifest import digest
from headavatar.contract.stage import Stage, StageContext
from headavatar.errors import ConfigError
from headavatar.imaging import CropResize, decode_image, encode_jpg
from headavatar.layout import FRAMES_INDEX, ground_truth_prefix
from headavatar.matting.factory import NO_WEIGHTS, build_matter
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Item:
    folder: str
    sequence: str  # sequence name, without the part suffix
    video_frame: int
    camera: str


def prefetch(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: list[T], ahead: int) -> Iterator[R]:
    """``map`` with at most ``ahead`` results in flight, so memory stays bounded."""
    queue: deque[Future[R]] = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) > ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def iou(alpha: np.ndarray, truth: np.ndarray) -> float:
    p, g = alpha > 0.5, truth > 0.5
    union = np.logical_or(p, g).sum()
    return float(np.logical_and(p, g).sum() / union) if union else 1.0


def overlay(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The subject as filmed, the rest dimmed and tinted, so matte errors stand out."""
    tint = np.array([90, 30, 160], np.float32)
    a = alpha[..., None]
    return (image * a + (0.35 * image + 0.65 * tint) * (1 - a)).astype(np.uint8)


class Matting(Stage):
    name = "matting"
    inputs = ("sample",)
    config_sections = ("capture", "extract", "matting")
    code_version = 1  # bump when a change makes this stage's outputs differ (docs/caching.md)

    def raw_inputs(self, store: ObjectStore, capture: str, config: PipelineConfig) -> dict[str, str]:
        truth = [(o.key, o.size, o.etag) for o in store.list(store.key(ground_truth_prefix(capture)))
                 if "/alpha/" in o.key]
        inputs = {"ground_truth_alpha": digest(truth)} if truth else {}
        cfg = config.matting
        if cfg.method == "bmv2":
            if not cfg.weights:
                raise ConfigError(NO_WEIGHTS)
            inputs["weights"] = asset_identity(store, cfg.weights, "matting.weights")
        return inputs

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.matting
        matter = build_matter(cfg, ctx.store, ctx.scratch)  # weights problems surface before any frame
        index = json.loads(ctx.store.get_bytes(ctx.input_key("sample", FRAMES_INDEX)))
        cams = list(ctx.config.capture.cameras)
        items = [Item(f["folder"], f["sequence"].rsplit("_part-", 1)[0], f["video_frame"], c)
                 for f in index["frames"] for c in cams]
        truth_root = ctx.store.key(ground_truth_prefix(ctx.capture))
        has_truth = "ground_truth_alpha" in ctx.inputs
        crop = CropResize.from_config(ctx.config.extract)
        workers = max(2, ctx.store.cfg.max_concurrency // 2)
        with ThreadPoolExecutor(workers, thread_name_prefix="matting-io") as io:
            plates = dict(zip(cams, io.map(lambda c: decode_image(
                ctx.store.get_bytes(ctx.input_key("sample", f"background/image_{c}.jpg")), c), cams), strict=True))

            def load(item: Item) -> tuple[np.ndarray, np.ndarray | None]:
                rel = f"images/{item.folder}/image_{item.camera}.jpg"
                img = decode_image(ctx.store.get_bytes(ctx.input_key("sample", rel)), rel)
                truth = None
                if has_truth:
                    key = f"{truth_root}/{item.sequence}/alpha/{item.video_frame:04d}/cam_{item.camera}.png"
                    gt = cv2.imdecode(np.frombuffer(ctx.store.get_bytes(key), np.uint8), cv2.IMREAD_GRAYSCALE)
                    truth = crop.apply(gt).astype(np.float32) / 255
                return img, truth

            coverage, ious, sheets = [], [], {}
            batch = max(1, matter.batch_size)
            # Decoding/downloads of the next batch overlap with matting of the current one.
            pending = prefetch(io, load, items, ahead=2 * batch + workers)
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                loaded = [next(pending) for _ in chunk]
                alphas = matter([img for img, _ in loaded], [plates[i.camera] for i in chunk])
                for item, (img, truth), alpha in zip(chunk, loaded, alphas, strict=True):
                    self._write(ctx, item, alpha, crop.lowres_size)
                    coverage.append(float(alpha.mean()))
                    if truth is not None:
                        ious.append(iou(alpha, truth))
                    if item.folder == items[0].folder:
                        sheets[item.camera] = cv2.resize(overlay(img, alpha), (256, 256))
                done = start + len(chunk)
                if done % (len(cams) * 4) < batch or done == len(items):
                    log.info("%s/matting: %d/%d images", ctx.capture, done, len(items))
        grid = [np.hstack([sheets[c] for c in cams[r : r + 4]]) for r in range(0, len(cams), 4)]
        if all(g.shape == grid[0].shape for g in grid):
            ctx.outputs.put_bytes(f"overlays/{items[0].folder}.jpg", encode_jpg(np.vstack(grid), 90))
        ctx.metrics.update({"images": len(items), "mean_alpha_coverage": float(np.mean(coverage))})
        if ious:
            ctx.metrics.update({"iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious))})
            log.info("%s/matting: IoU vs ground truth mean %.4f, min %.4f", ctx.capture, np.mean(ious), np.min(ious))

    @staticmethod
    def _write(ctx: StageContext, item: Item, alpha: np.ndarray, lowres: int) -> None:
        mask = (alpha * 255 + 0.5).astype(np.uint8)
        folder, cam = item.folder, item.camera
        ctx.outputs.put_bytes(f"images/{folder}/mask_{cam}.jpg", encode_jpg(mask))
        ctx.outputs.put_bytes(f"images/{folder}/mask_lowres_{cam}.jpg", encode_jpg(cv2.resize(mask, (lowres, lowres))))

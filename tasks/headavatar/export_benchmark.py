"""``headavatar export benchmark``: a NeRSemble novel-view benchmark submission from trained avatars.

For each requested capture and sequence, every frame of the sequence is rendered from the benchmark's three
hold-out cameras and encoded as the toolkit encodes it (:mod:`headavatar.nvs_submission`).

*Whole frames from a crop-trained avatar.* The avatar learned from the square crop of each frame that stage 1
cut out (``extract.crop_*``, 2600 source pixels resized to 2048 on NeRSemble). The benchmark takes whole
frames, 1100x1604. Each hold-out camera is therefore rendered with its own full-frame calibration over the
whole frame at the scale the avatar was trained at (its coarse pixels per source pixel, super-resolved by the
same factor, so the super-resolution net sees what it learned on), then resized to 1100x1604. What lies
outside the crop (on NeRSemble the top and bottom 304 source rows) was never trained on: the parts of the
head that project there are still rendered, and everything that is not the avatar (torso, background) is
black, as the matted training targets were.

*Every frame, not only the sampled ones.* Stage 2 keeps every ``sample.frame_stride``-th frame and stage 4
fits only those. A frame in between is posed by interpolating the two nearest fitted frames: expression and
translation linearly, head rotation by quaternion slerp (a trained frame's learned pose correction included).
"""

from __future__ import annotations

import bisect
import json
import logging
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headavatar.contract.stage import read_manifest
from headavatar.errors import ConfigError, PipelineError
from headavatar.gaussianhead.trainer import GaussianHeadTrainer
from headavatar.layout import FRAMES_INDEX, stage_prefix
from headavatar.nvs_submission import (
    HEIGHT,
    HOLD_OUT_SERIALS,
    SEQUENCES,
    WIDTH,
    Request,
    add_video,
    check_submission,
    video_name,
)
from headavatar.posing import avatar_frames
from headavatar.render.gaussian_raster import Splats
from headavatar.settings import PipelineConfig, sequence_name
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fitted:
    """A fitted frame of the sequence: its video frame, expression (K,) and corrected pose (6,)."""

    video_frame: int
    exp: torch.Tensor
    pose: torch.Tensor


def _index(store: ObjectStore, capture: str, stage: str) -> dict:
    return json.loads(store.get_bytes(store.key(stage_prefix(capture, stage), FRAMES_INDEX)))


def sequence_track(trainer: GaussianHeadTrainer, store: ObjectStore, capture: str,
                   sequence: str) -> tuple[list[Fitted], int]:
    """The avatar's fitted frames of ``sequence`` in video order (parts one after another), and the number
    of frames the sequence has."""
    extracted = _index(store, capture, "extract")["sequences"]
    parts = sorted((s for s in extracted if s["name"] == sequence), key=lambda s: s["part"])
    if not parts:
        known = sorted({s["name"] for s in extracted})
        raise ConfigError(f"{capture}: no sequence {sequence!r} was extracted (its sequences: {', '.join(known)})")
    offset, total = {}, 0
    for s in parts:
        offset[f"{s['name']}_part-{s['part']}"] = total
        total += s["video_frames"]
    where = {f["folder"]: offset[f["sequence"]] + f["video_frame"] for f in _index(store, capture, "sample")["frames"]
             if sequence_name(f["sequence"]) == sequence}
    track = []
    for folder, (views, i, known) in avatar_frames(trainer).items():
        if folder in where:
            pose = views.pose[i] + (trainer.head.delta_pose[i].detach() if known else 0)
            track.append(Fitted(where[folder], views.exp[i], pose))
    if not track:
        raise PipelineError(f"{capture}: the avatar has no fitted frame of sequence {sequence!r}")
    return sorted(track, key=lambda t: t.video_frame), total


def _quaternion(axis_angle: torch.Tensor) -> torch.Tensor:
    angle = axis_angle.norm()
    axis = axis_angle / angle if angle > 1e-12 else torch.zeros_like(axis_angle)
    return torch.cat([torch.cos(angle / 2)[None], torch.sin(angle / 2) * axis])


def _axis_angle(q: torch.Tensor) -> torch.Tensor:
    q = q / q.norm()
    q = -q if q[0] < 0 else q
    s = q[1:].norm()
    return q[1:] * (2 * torch.atan2(s, q[0]) / s) if s > 1e-12 else 2 * q[1:]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Axis-angle rotation (3,) a fraction ``t`` of the way from ``a`` to ``b`` along the shortest arc."""
    qa, qb = _quaternion(a), _quaternion(b)
    dot = float((qa * qb).sum())
    if dot < 0:
        qb, dot = -qb, -dot
    if dot > 0.9995:  # nearly the same rotation: the arc is a line
        return _axis_angle(qa + t * (qb - qa))
    theta = float(np.arccos(dot))
    return _axis_angle((np.sin((1 - t) * theta) * qa + np.sin(t * theta) * qb) / np.sin(theta))


def pose_at(track: list[Fitted], frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expression and pose at video frame ``frame``: a fitted frame's own, or interpolated between the two
    nearest (held constant before the first and after the last)."""
    frames = [t.video_frame for t in track]
    i = bisect.bisect_right(frames, frame) - 1
    if i < 0:
        return track[0].exp, track[0].pose
    if i == len(track) - 1 or frames[i] == frame:
        return track[i].exp, track[i].pose
    a, b = track[i], track[i + 1]
    t = (frame - a.video_frame) / (b.video_frame - a.video_frame)
    pose = torch.cat([slerp(a.pose[:3], b.pose[:3], t), a.pose[3:] + t * (b.pose[3:] - a.pose[3:])])
    return a.exp + t * (b.exp - a.exp), pose


@torch.no_grad()
def render_full_frame(trainer: GaussianHeadTrainer, exp: torch.Tensor, pose: torch.Tensor, world_to_cam: np.ndarray,
                      intrinsic: np.ndarray, frame_size: tuple[int, int], coarse_per_source: float) -> np.ndarray:
    """The avatar seen by a camera with full-frame calibration (``intrinsic`` (3, 3), ``world_to_cam``
    (4, 4) or (3, 4)) over its whole ``frame_size`` (width, height), rasterised at ``coarse_per_source``
    coarse pixels per source pixel, super-resolved, resized to the benchmark's size: (HEIGHT, WIDTH, 3) uint8."""
    width, height = frame_size
    w, h = max(1, round(width * coarse_per_source)), max(1, round(height * coarse_per_source))
    k = torch.as_tensor(intrinsic, dtype=torch.float32, device=trainer.device).clone()
    k[0] *= w / width
    k[1] *= h / height
    view = torch.eye(4, device=trainer.device)
    view[:3] = torch.as_tensor(np.asarray(world_to_cam)[:3], dtype=torch.float32, device=trainer.device)
    s = trainer.head.splats(exp, pose, trainer.coarse.scale, None)
    with torch.autocast(trainer.device.type, enabled=False):
        feats, _ = trainer.raster(Splats(*(t.float() for t in (s.means, s.quats, s.scales, s.opacities, s.colors))),
                                  view, k, w, h, with_alpha=False)
    _, sr = trainer.super_resolve(feats)
    out = torch.nn.functional.interpolate(sr.clamp(0, 1)[None], size=(HEIGHT, WIDTH), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    return (out.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _check_cameras(trainer: GaussianHeadTrainer, calibrated: dict[str, np.ndarray], capture: str) -> None:
    missing = [s for s in HOLD_OUT_SERIALS if s not in calibrated]
    if missing:
        raise ConfigError(f"{capture}: camera_params has no camera {missing[0]}, a benchmark hold-out camera")
    cams = trainer.coarse.cameras
    trained = [s for s in HOLD_OUT_SERIALS if s in cams and cams.index(s) not in trainer.held_cams]
    if trained:
        raise ConfigError(f"{capture}: the avatar was trained on camera {trained[0]}, which the benchmark holds out: "
                          f"train it with --config config/benchmark-nvs.yaml (docs/benchmark.md)")


def _frames(trainer: GaussianHeadTrainer, track: list[Fitted], count: int, world_to_cam: np.ndarray,
            intrinsic: np.ndarray, frame_size: tuple[int, int], coarse_per_source: float) -> Iterator[np.ndarray]:
    for k in range(count):
        exp, pose = pose_at(track, k)
        yield render_full_frame(trainer, exp, pose, world_to_cam, intrinsic, frame_size, coarse_per_source)


def export_benchmark(store: ObjectStore, requests: list[Request], config: PipelineConfig, out: Path,
                     evaluate: bool = False) -> dict[str, Any]:
    """Write the submission zip ``out`` (whole, or not at all) and check it; with ``evaluate``, score it
    against the captures' synthetic ground truth (:mod:`headavatar.nvs_scores`)."""
    from headavatar.raw import discover
    from headavatar.render_avatar import load_avatar

    if len({(r.participant, r.sequence) for r in requests}) != len(requests):
        raise ConfigError("a capture and sequence is requested twice")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    expected, videos = {}, {}
    with tempfile.TemporaryDirectory(prefix="headavatar-benchmark-") as scratch, zipfile.ZipFile(part, "w") as zf:
        for r in requests:
            trainer = load_avatar(store, r.capture, config)
            params = discover(store, r.capture, config).camera_params
            _check_cameras(trainer, params.world_to_cam, r.capture)
            crop = read_manifest(store, r.capture, "extract").config["extract"]["crop_size"]  # type: ignore[union-attr]
            track, count = sequence_track(trainer, store, r.capture, r.sequence)
            for serial in HOLD_OUT_SERIALS:
                name, started = video_name(r.participant, r.sequence, serial), time.monotonic()
                frames = _frames(trainer, track, count, params.world_to_cam[serial], params.intrinsic,
                                 params.frame_size, trainer.coarse.size / crop)
                videos[name] = add_video(zf, name, frames, Path(scratch))
                expected[name] = count
                log.info("%s: %d frames (%d fitted) rendered and encoded in %.1f s", name, count, len(track),
                         time.monotonic() - started)
    issues = check_submission(part, expected)
    if issues:
        part.unlink()
        raise PipelineError(f"{out.name}: the submission does not pass its check: {issues}")
    part.replace(out)
    result: dict[str, Any] = {"out": str(out), "bytes": out.stat().st_size, "videos": videos,
                              "benchmark_videos_missing": sorted(
                                  video_name(p, s, c) for p, s in SEQUENCES.items() for c in HOLD_OUT_SERIALS
                                  if video_name(p, s, c) not in videos)}
    if evaluate:
        from headavatar.nvs_scores import score_submission

        result["scores"] = score_submission(store, config, out, requests)
    return result

"""Write a synthetic NeRSemble capture (raw layout + ground truth) for a capture id.

The head is the synthetic morphable model, posed and animated per frame, rendered into every
camera of a 16-camera rig over that camera's background plate, so the capture is geometrically
consistent across views and later stages can be scored against the saved truth.

Either raw layout (:mod:`headavatar.layout`): ``v1`` as NeRSemble's archives unpack, or ``v2`` as
``nersemble-data download`` writes a participant folder. A v2 capture also gets a synthetic
``color_calibration.json``: each camera's frames and plate are written through the inverse of its
matrix, so applying the calibration (stage 1) gives back the v1 capture's colours.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from headavatar.capture_id import validate_capture_id
from headavatar.color import ColorCorrection
from headavatar.fitting.bfm import MorphableModel
from headavatar.layout import BACKGROUND_SEQUENCE, GROUND_TRUTH, LAYOUTS, V2
from headavatar.settings import NERSEMBLE_CAMERAS
from headavatar.synthetic.morphable import build_model
from headavatar.synthetic.render import TEXTURES, Camera, render, texture_atlas

log = logging.getLogger(__name__)

REFERENCE_WIDTH, REFERENCE_HEIGHT = 2200, 3208
FOCAL_AT_REFERENCE = 6600.0  # px; a ~0.23 m head spans ~1500 px at 1 m, as in the real rig
MODEL_TO_WORLD = 1e-3  # the model is in millimetres, the world in metres
LIGHT = np.array([0.3, 0.4, 0.87]) / np.linalg.norm([0.3, 0.4, 0.87])


@dataclass(frozen=True)
class SyntheticSpec:
    capture: str
    width: int = REFERENCE_WIDTH
    height: int = REFERENCE_HEIGHT
    frames: int = 90
    sequences: tuple[str, ...] = ("EXP-1-head",)
    cameras: tuple[str, ...] = NERSEMBLE_CAMERAS
    fps: int = 30
    crf: int = 16
    noise: float = 2.0  # sensor noise (std of 8-bit levels) on frames and plates, as real cameras have
    seed: int = 0
    frame_lengths: dict[str, int] = field(default_factory=dict)  # "SEQ/cam" -> frames (odd cases)
    layout: str = "v1"  # headavatar.layout.LAYOUTS
    texture: str = "procedural"  # render.TEXTURES; "astronaut": a real face photo for real detectors (opt-in)

    def __post_init__(self) -> None:
        validate_capture_id(self.capture)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.width % 2 or self.height % 2 or self.width < 32 or self.height < 32:
            raise ValueError("width and height must be even and at least 32 (H.264 4:2:0)")
        if self.frames < 1:
            raise ValueError("frames must be >= 1")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {', '.join(TEXTURES)}, got {self.texture!r}")


def rig(spec: SyntheticSpec) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Shared intrinsics and per-camera 4x4 world-to-camera (OpenCV: x right, y down, z forward)."""
    rng = np.random.default_rng(1000 + spec.seed)
    s = spec.width / REFERENCE_WIDTH
    intr = np.array([[FOCAL_AT_REFERENCE * s, 0, spec.width / 2 - 0.5],
                     [0, FOCAL_AT_REFERENCE * s, spec.height / 2 - 0.5],
                     [0, 0, 1.0]])
    n = len(spec.cameras)
    extr = {}
    for i, cam in enumerate(spec.cameras):
        azim = np.deg2rad(-75 + 150 * i / max(n - 1, 1)) + rng.normal(0, 0.01)
        elev = np.deg2rad(10.0 if i % 2 else -8.0) + rng.normal(0, 0.01)
        dist = 1.0 + rng.uniform(-0.03, 0.03)
        center = dist * np.array([np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim)])
        target = np.array([0.0, 0.01, 0.0]) + rng.normal(0, 0.003, 3)
        fwd = (target - center) / np.linalg.norm(target - center)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        r = np.stack([right, down, fwd])
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = r, -r @ center
        extr[cam] = m
    return intr, extr


def axis_angle_to_matrix(rv: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(rv, np.float64).reshape(3, 1))[0]


def motion(spec: SyntheticSpec, sequence: str, n_frames: int, n_exp: int) -> dict[str, np.ndarray]:
    """Smooth per-frame head pose and expression for one sequence (deterministic)."""
    rng = np.random.default_rng([spec.seed, sum(map(ord, sequence))])
    t = np.arange(n_frames)[:, None] / max(spec.fps, 1)
    phase = rng.uniform(0, 2 * np.pi, (1, 6))
    freq = rng.uniform(0.15, 0.45, (1, 6))
    wave = np.sin(2 * np.pi * freq * t + phase)
    rotation = np.deg2rad(wave[:, :3] * [10.0, 18.0, 5.0])  # pitch, yaw, roll
    translation = wave[:, 3:] * [0.01, 0.008, 0.015]
    ephase = rng.uniform(0, 2 * np.pi, (1, n_exp))
    efreq = rng.uniform(0.2, 0.7, (1, n_exp))
    expression = 0.5 + 0.5 * np.sin(2 * np.pi * efreq * t + ephase)
    return {"rotation": rotation, "translation": translation, "exp_coeff": expression}


def color_matrix(spec: SyntheticSpec, camera: str) -> np.ndarray:
    """The synthetic 3x3 colour calibration of one camera (RGB): channel gains and a little cross-talk."""
    rng = np.random.default_rng([spec.seed, int(camera), 77])
    mix = np.eye(3) + rng.uniform(0.0, 0.04, (3, 3)) * (1 - np.eye(3))
    return np.diag(rng.uniform(1.04, 1.2, 3)) @ mix


def miscalibrate(image: np.ndarray, spec: SyntheticSpec, camera: str) -> np.ndarray:
    """What the camera recorded: the true colours through the inverse of its calibration (v2 only)."""
    if spec.layout != "v2":
        return image
    return ColorCorrection(np.linalg.inv(color_matrix(spec, camera)))(image)


class RawPaths:
    """Where one synthetic capture's raw files go, in its layout (under the ``raw/`` root)."""

    def __init__(self, spec: SyntheticSpec, raw_root: Path):
        self.spec, self.cid = spec, spec.capture
        self.root = raw_root / V2 / self.cid if spec.layout == "v2" else raw_root

    def camera_params(self) -> Path:
        if self.spec.layout == "v2":
            return self.root / "calibration" / "camera_params.json"
        return self.root / "camera_params" / self.cid / "camera_params.json"

    def color_calibration(self) -> Path:
        return self.root / "calibration" / "color_calibration.json"

    def background(self, camera: str) -> Path:
        if self.spec.layout == "v2":
            return self.root / "sequences" / "BACKGROUND" / f"image_{camera}.jpg"
        return self.root / BACKGROUND_SEQUENCE / self.cid / "BACKGROUND" / f"image_{camera}.jpg"

    def video(self, sequence: str, camera: str) -> Path:
        if self.spec.layout == "v2":
            return self.root / "sequences" / sequence / "images" / f"cam_{camera}.mp4"
        return self.root / f"sequence_{sequence}_part-1" / self.cid / sequence / f"cam_{camera}.mp4"


NOISE_ROWS = 64  # image rows noised at a time


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` (uint8) plus Gaussian noise of std ``sigma`` (float32 arithmetic), clipped to 0..255.

    Drawn and added a band of ``NOISE_ROWS`` rows at a time into one buffer: the generator fills the
    bands in order, so the draws, and the result, are those of one whole-image draw (to the bit), with
    no whole-image float temporaries."""
    if sigma <= 0:
        return image
    out = np.empty_like(image)
    buf = np.empty((min(NOISE_ROWS, len(image)), *image.shape[1:]), np.float32)
    for y in range(0, len(image), NOISE_ROWS):
        band = buf[: len(image[y:y + NOISE_ROWS])]
        rng.standard_normal(band.shape, dtype=np.float32, out=band)
        band *= np.float32(sigma)
        band += image[y:y + NOISE_ROWS]
        np.clip(band, 0, 255, out=band)
        out[y:y + NOISE_ROWS] = band  # truncates toward zero, as astype(uint8) does
    return out


NOISE_DEVICE_ENV = "HEADAVATAR_SYNTH_NOISE_DEVICE"  # e.g. "cuda": the videos' sensor noise drawn there (torch)


class TorchNoise:
    """Sensor noise drawn with PyTorch on ``device`` (a GPU: the draws then cost the CPU nothing): the same
    distribution and arithmetic as :func:`add_noise` (float32 image + N(0, sigma^2), clipped to 0..255,
    truncated to uint8), from another generator, so such a capture differs from the numpy one in its noise
    samples only. Opt-in (``$HEADAVATAR_SYNTH_NOISE_DEVICE``); the captures tests make use numpy's."""

    def __init__(self, device: str, seed: list[int]):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]) >> 1)

    def __call__(self, image: np.ndarray, sigma: float) -> np.ndarray:
        if sigma <= 0:
            return image
        torch = self.torch
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        noisy = torch.randn(pixels.shape, generator=self.gen, device=self.device, dtype=torch.float32)
        noisy.mul_(sigma).add_(pixels)
        return noisy.clamp_(0, 255).to(torch.uint8).cpu().numpy()


def noise_source(spec: SyntheticSpec, camera: str, sequence: str) -> Callable[[np.ndarray, float], np.ndarray]:
    """The noise of one camera's video of one sequence: numpy's generator seeded by (seed, camera, sequence),
    or :class:`TorchNoise` on ``$HEADAVATAR_SYNTH_NOISE_DEVICE`` when set (numpy's again from the first
    frame it fails on, e.g. with no GPU there)."""
    seed = [spec.seed, int(camera), sum(map(ord, sequence))]
    rng = np.random.default_rng(seed)
    device = os.environ.get(NOISE_DEVICE_ENV, "")
    drawn: list[Callable[[np.ndarray, float], np.ndarray]] = []
    if device:
        try:
            drawn.append(TorchNoise(device, seed))
        except Exception as e:  # no torch, no such device
            log.warning("noise on %s unavailable (%s): drawn with numpy", device, e)

    def noise(image: np.ndarray, sigma: float) -> np.ndarray:
        if drawn:
            try:
                return drawn[0](image, sigma)
            except Exception as e:
                log.warning("noise on %s failed (%s): drawn with numpy from here", device, e)
                drawn.clear()
        return add_noise(image, sigma, rng)

    return noise


def background_plate(camera: str, width: int, height: int) -> np.ndarray:
    """A textured studio-like backdrop, different per camera, deterministic (noise-free)."""
    rng = np.random.default_rng(int(camera) % (2**32))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        90 + 60 * x / width + 10 * np.sin(y / height * 7 + rng.uniform(0, 6)),
        120 + 40 * y / height,
        150 - 50 * x / width,
    ], -1)
    img = np.clip(base, 0, 255).astype(np.uint8)
    scale = width / REFERENCE_WIDTH
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(40, 230, 3))
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = (max(2, int(rng.integers(60, 500) * scale)), max(2, int(rng.integers(60, 500) * scale)))
        if rng.random() < 0.5:
            cv2.rectangle(img, p0, (p0[0] + size[0], p0[1] + size[1]), c, -1)
        else:
            cv2.ellipse(img, p0, size, float(rng.uniform(0, 180)), 0, 360, c, -1)
    return img


@dataclass(frozen=True)
class _CameraJob:
    spec: SyntheticSpec
    sequence: str
    camera: str
    n_frames: int
    video_path: Path
    alpha_dir: Path


def _render_camera_video(job: _CameraJob) -> str:
    import av  # here, so the geometry helpers above import without PyAV (GPU benchmark hosts)

    spec = job.spec
    model = build_model()
    intr, extr = rig(spec)
    camera = Camera(intr, extr[job.camera], spec.width, spec.height)
    truth = sequence_truth(spec, model, job.sequence, job.n_frames)
    plate = background_plate(job.camera, spec.width, spec.height)
    noise = noise_source(spec, job.camera, job.sequence)
    job.video_path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(job.video_path), "w") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = {"crf": str(spec.crf), "preset": "veryfast"}
        stream.thread_count = 1
        for f in range(job.n_frames):
            r = render(truth["vertices"][f], model.faces, model.uv, camera, plate, LIGHT, spec.texture)
            recorded = noise(miscalibrate(r.image, spec, job.camera), spec.noise)
            frame = av.VideoFrame.from_ndarray(recorded, format="bgr24")
            container.mux(stream.encode(frame))
            out = job.alpha_dir / f"{f:04d}"
            out.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / f"cam_{job.camera}.png"), r.alpha)
        container.mux(stream.encode(None))
    return job.camera


def identity(spec: SyntheticSpec, model: MorphableModel) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, 7])
    return rng.normal(0, 0.6, model.id_base.shape[1])


def sequence_truth(spec: SyntheticSpec, model: MorphableModel, sequence: str, n_frames: int) -> dict[str, np.ndarray]:
    """Per-frame pose, coefficients, world vertices and 3D landmarks of one sequence."""
    mo = motion(spec, sequence, n_frames, model.exp_base.shape[1])
    id_coeff = identity(spec, model)
    scale = MODEL_TO_WORLD * 1.0
    verts, lmks = [], []
    for f in range(n_frames):
        v_model = model.shape(id_coeff, mo["exp_coeff"][f])
        rot = axis_angle_to_matrix(mo["rotation"][f])
        v_world = scale * v_model @ rot.T + mo["translation"][f]
        verts.append(v_world)
        lmks.append(v_world[model.keypoints])
    return {**mo, "id_coeff": id_coeff, "scale": np.float64(scale),
            "vertices": np.stack(verts), "landmarks_3d": np.stack(lmks)}


def write_capture(spec: SyntheticSpec, out_dir: Path, workers: int = 0) -> Path:
    """Write the raw layout under ``out_dir`` (the ``raw/`` root; v2 goes to ``raw/v2/<id>/``) and the truth
    beside it."""
    out_dir = Path(out_dir)
    cid = spec.capture
    model = build_model()
    intr, extr = rig(spec)

    paths = RawPaths(spec, out_dir)
    params = paths.camera_params()
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(json.dumps({
        "world_2_cam": {c: extr[c].tolist() for c in spec.cameras},
        "intrinsics": intr.tolist(),
    }, indent=1))
    if spec.layout == "v2":
        paths.color_calibration().write_text(json.dumps(
            {c: color_matrix(spec, c).tolist() for c in spec.cameras}, indent=1))

    for cam in spec.cameras:
        plate = add_noise(miscalibrate(background_plate(cam, spec.width, spec.height), spec, cam), spec.noise,
                          np.random.default_rng([spec.seed, int(cam)]))
        paths.background(cam).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(paths.background(cam)), plate, [cv2.IMWRITE_JPEG_QUALITY, 95])

    truth_dir = out_dir.parent / GROUND_TRUTH / cid
    truth_dir.mkdir(parents=True, exist_ok=True)
    model.save_mat(truth_dir / "morphable_model.mat")
    np.savez(truth_dir / "cameras.npz", intrinsic=intr,
             **{f"world_2_cam_{c}": extr[c] for c in spec.cameras})

    jobs = []
    for seq in spec.sequences:
        lengths = {c: spec.frame_lengths.get(f"{seq}/{c}", spec.frames) for c in spec.cameras}
        n_max = max(lengths.values())
        truth = sequence_truth(spec, model, seq, n_max)
        (truth_dir / seq).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(truth_dir / seq / "params.npz", **{k: v for k, v in truth.items() if k != "vertices"})
        for cam in spec.cameras:
            if lengths[cam] == 0:
                continue  # odd-case captures: this camera is missing from this sequence
            video = paths.video(seq, cam)
            jobs.append(_CameraJob(spec, seq, cam, lengths[cam], video, truth_dir / seq / "alpha"))

    texture_atlas(spec.texture)  # bake once in the parent; forked workers inherit it
    workers = workers or _cpu_count()
    desc = f"synthesising {cid}: {len(jobs)} videos of {spec.width}x{spec.height}"
    if workers == 1:
        for job in tqdm(jobs, desc=desc, unit="video"):
            _render_camera_video(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(tqdm(pool.map(_render_camera_video, jobs), total=len(jobs), desc=desc, unit="video"))
    return out_dir


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

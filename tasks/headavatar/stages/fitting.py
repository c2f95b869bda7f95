"""Stage 4: 68 landmarks in every kept image, then one multiview BFM09 fit over all frames.

Outputs (the layout Gaussian Head Avatar's loaders read, plus reports)::

    landmarks/<NNNN>/lmk_<cam>.npy   (68, 3) x, y, confidence in full-size image pixels
    landmarks/detections.json        per frame and camera: found or missing, face score
    params/<NNNN>/params.npz         pose (1, 6) axis-angle + translation, scale (1,), id_coeff (1, K_id),
                                     exp_coeff (1, K_exp) — the reference's arrays
    params/<NNNN>/lmk_3d.npy         (68, 3) fitted 3D landmarks, world
    params/<NNNN>/vertices.npy       (N, 3) fitted mesh, world
    report.json                      reprojection error per frame and camera, excluded frames, loss history
    overlays/landmarks_<NNNN>.jpg    detected landmarks over every camera (missing cameras crossed out)
    overlays/fit_<NNNN>.jpg          fitted mesh and landmarks over every camera

A frame seen by fewer than ``fitting.min_views`` cameras is excluded and reported; if every frame
is excluded the stage fails with a message saying how many faces were found.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from headavatar.assets import asset_identity, fetch_asset
from headavatar.contract.manifest import digest
from headavatar.contract.stage import Stage, StageContext
from headavatar.devices import resolve_device
from headavatar.errors import ConfigError, PipelineError
from headavatar.fitting.bfm import BFM_INSTRUCTIONS, MorphableModel
from headavatar.fitting.solver import Fit, Observations, fit
from headavatar.imaging import decode_image, encode_jpg, npz_arrays, npz_bytes
from headavatar.landmarks.base import LandmarkDetector, Landmarks
from headavatar.landmarks.dlib68 import DLIB_INSTRUCTIONS
from headavatar.landmarks.factory import build_detector
from headavatar.layout import FRAMES_INDEX, ground_truth_prefix
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
SYNTHETIC_MODEL = "synthetic"
THUMB = 256


@dataclass(frozen=True)
class Frame:
    folder: str
    sequence: str  # without the part suffix
    video_frame: int


@dataclass(frozen=True)
class Camera:
    intrinsic: np.ndarray  # (3, 3)
    extrinsic: np.ndarray  # (3, 4)


def _truth_keys(store: ObjectStore, capture: str) -> dict[str, tuple[str, int, str]]:
    root = store.key(ground_truth_prefix(capture))
    return {o.key[len(root) + 1:]: (o.key, o.size, o.etag) for o in store.list(root)
            if o.key.endswith(("/params.npz", "/morphable_model.mat"))}


class Fitting(Stage):
    name = "fitting"
    inputs = ("sample",)
    config_sections = ("capture", "extract", "landmarks", "fitting")
    code_version = 2  # bump when outputs change (docs/caching.md); 2: .npz bytes independent of the Python release

    def raw_inputs(self, store: ObjectStore, capture: str, config: PipelineConfig) -> dict[str, str]:
        truth = _truth_keys(store, capture)
        inputs = {"ground_truth": digest(sorted(truth.values()))} if truth else {}
        model = config.fitting.face_model
        if not model:
            raise ConfigError(f"fitting.face_model is not set. {BFM_INSTRUCTIONS}")
        if model == SYNTHETIC_MODEL:
            if "morphable_model.mat" not in truth:
                raise ConfigError(f"fitting.face_model=synthetic needs a synthetic capture: no "
                                  f"{store.uri(store.key(ground_truth_prefix(capture), 'morphable_model.mat'))}")
        else:
            inputs["face_model"] = asset_identity(store, model, "fitting.face_model", f". {BFM_INSTRUCTIONS}")
        if config.landmarks.detector == "dlib":
            inputs["dlib_model"] = asset_identity(store, config.landmarks.dlib_model, "landmarks.dlib_model",
                                                  f". {DLIB_INSTRUCTIONS}")
        if config.landmarks.detector == "ground_truth" and not any(k.endswith("params.npz") for k in truth):
            raise ConfigError("landmarks.detector=ground_truth needs a synthetic capture: no "
                              f"{store.uri(store.key(ground_truth_prefix(capture)))}/<sequence>/params.npz")
        return inputs

    def run(self, ctx: StageContext) -> None:
        cfg, lcfg = ctx.config.fitting, ctx.config.landmarks
        model = self._face_model(ctx)
        truth = self._truth(ctx)
        dlib_model = (fetch_asset(ctx.store, lcfg.dlib_model, "landmarks.dlib_model", ctx.scratch,
                                  f". {DLIB_INSTRUCTIONS}") if lcfg.detector == "dlib" else None)
        detector = None if lcfg.detector == "ground_truth" else build_detector(lcfg, dlib_model)  # before any image
        index = json.loads(ctx.store.get_bytes(ctx.input_key("sample", FRAMES_INDEX)))
        frames = [Frame(f["folder"], f["sequence"].rsplit("_part-", 1)[0], f["video_frame"]) for f in index["frames"]]
        cams = list(ctx.config.capture.cameras)
        size = ctx.config.extract.output_size
        workers = max(2, ctx.store.cfg.max_concurrency // 2)
        with ThreadPoolExecutor(workers, thread_name_prefix="fitting-io") as pool:
            cameras = self._cameras(ctx, pool, frames, cams)
            found = self._landmarks(ctx, pool, detector, frames, cams, cameras, truth)

        points = np.zeros((len(frames), len(cams), 68, 2))
        conf = np.zeros((len(frames), len(cams), 68))
        for (fi, ci), lm in found.items():
            points[fi, ci], conf[fi, ci] = lm.points, lm.confidence
        conf[..., list(cfg.exclude_landmarks)] = 0
        views = (conf > 0).any(-1).sum(1)
        keep = np.flatnonzero(views >= cfg.min_views)
        excluded = [{"folder": frames[i].folder, "cameras_with_face": int(views[i])}
                    for i in range(len(frames)) if views[i] < cfg.min_views]
        for e in excluded:
            log.warning("%s/fitting: frame %s excluded: a face in %d camera(s), %d needed",
                        ctx.capture, e["folder"], e["cameras_with_face"], cfg.min_views)
        if not len(keep):  # the detection report stays for the user to read (no manifest: not done)
            raise PipelineError(
                f"no frame of {ctx.capture} has landmarks in at least {cfg.min_views} cameras "
                f"({len(found)} faces found in {len(frames) * len(cams)} images, "
                f"landmarks.detector={lcfg.detector})")

        intr = np.stack([[cameras[(i, c)].intrinsic for c in range(len(cams))] for i in keep])
        extr = np.stack([[cameras[(i, c)].extrinsic for c in range(len(cams))] for i in keep])
        obs = Observations(points[keep], conf[keep], intr, extr, float(size))
        device = resolve_device(cfg.device)
        log.info("%s/fitting: fitting %d frames x %d cameras on %s", ctx.capture, len(keep), len(cams), device)
        result = fit(model, obs, cfg, device)

        reproj = result.reprojection_error(obs)
        for k, i in enumerate(keep):
            rel = f"params/{frames[i].folder}"
            ctx.outputs.put_bytes(f"{rel}/params.npz", npz_bytes(
                pose=result.pose()[k : k + 1].astype(np.float32), scale=np.array([result.scale], np.float32),
                id_coeff=result.id_coeff[None].astype(np.float32),
                exp_coeff=result.exp_coeff[k : k + 1].astype(np.float32)))
            ctx.outputs.put_bytes(f"{rel}/lmk_3d.npy", _npy(result.landmarks_3d[k].astype(np.float32)))
            ctx.outputs.put_bytes(f"{rel}/vertices.npy", _npy(result.vertices(model, k).astype(np.float32)))

        metrics = {
            "images": len(frames) * len(cams), "faces_found": len(found),
            "detection_rate": len(found) / (len(frames) * len(cams)),
            "frames_fitted": len(keep), "frames_excluded": len(excluded),
            "reprojection_error_px_mean": float(np.nanmean(reproj)),
            "reprojection_error_px_median": float(np.nanmedian(reproj)),
            "reprojection_error_px_max": float(np.nanmax(reproj)),
        }
        if truth:
            metrics.update(self._score_detection(found, frames, cams, cameras, truth))
            if ctx.config.fitting.face_model == SYNTHETIC_MODEL:
                metrics.update(score_pose(result, [frames[i] for i in keep], truth, model))
        ctx.metrics.update(metrics)
        log.info("%s/fitting: reprojection error mean %.3f px, max %.3f px over %d frames",
                 ctx.capture, metrics["reprojection_error_px_mean"], metrics["reprojection_error_px_max"], len(keep))

        report = {
            "frames": {frames[i].folder: {c: (None if np.isnan(reproj[k, j]) else round(float(reproj[k, j]), 4))
                                          for j, c in enumerate(cams)} for k, i in enumerate(keep)},
            "excluded_frames": excluded,
            "loss_history": [{"phase": p, "step": s, "loss": v} for p, s, v in result.history],
            "metrics": metrics,
        }
        ctx.outputs.put_bytes("report.json", json.dumps(report, indent=1).encode())
        self._overlays(ctx, frames, cams, cameras, keep, found, result, model)

    # --- inputs --------------------------------------------------------------------------------

    def _face_model(self, ctx: StageContext) -> MorphableModel:
        ref = ctx.config.fitting.face_model or ""
        if ref == SYNTHETIC_MODEL:
            key = ctx.store.key(ground_truth_prefix(ctx.capture), "morphable_model.mat")
            path = ctx.store.download_file(key, ctx.scratch / "morphable_model.mat")
            return MorphableModel.load_mat(path, ctx.store.uri(key))
        path = fetch_asset(ctx.store, ref, "fitting.face_model", ctx.scratch, f". {BFM_INSTRUCTIONS}")
        return MorphableModel.load_mat(path, ref)

    def _truth(self, ctx: StageContext) -> dict[str, dict[str, np.ndarray]]:
        """Per sequence: the synthetic capture's true pose, coefficients and 3D landmarks."""
        if "ground_truth" not in ctx.inputs:
            return {}
        out = {}
        for rel, (key, _, _) in _truth_keys(ctx.store, ctx.capture).items():
            if rel.endswith("/params.npz"):
                out[rel.split("/")[0]] = npz_arrays(ctx.store.get_bytes(key), ctx.store.uri(key))
        return out

    def _cameras(self, ctx: StageContext, pool: ThreadPoolExecutor, frames: list[Frame],
                 cams: list[str]) -> dict[tuple[int, int], Camera]:
        def load(job: tuple[int, int]) -> Camera:
            rel = f"cameras/{frames[job[0]].folder}/camera_{cams[job[1]]}.npz"
            key = ctx.input_key("sample", rel)
            z = npz_arrays(ctx.store.get_bytes(key), ctx.store.uri(key), ("intrinsic", "extrinsic"))
            return Camera(z["intrinsic"].astype(np.float64), z["extrinsic"][:3].astype(np.float64))

        jobs = [(f, c) for f in range(len(frames)) for c in range(len(cams))]
        return dict(zip(jobs, pool.map(load, jobs), strict=True))

    def _landmarks(self, ctx: StageContext, io_pool: ThreadPoolExecutor, detector: LandmarkDetector | None,
                   frames: list[Frame], cams: list[str], cameras: dict[tuple[int, int], Camera],
                   truth: dict[str, dict]) -> dict[tuple[int, int], Landmarks]:
        lcfg = ctx.config.landmarks

        def from_truth(job: tuple[int, int]) -> Landmarks | None:
            f, c = frames[job[0]], cams[job[1]]
            if face_angle_deg(truth, f, cameras[job]) > lcfg.truth_max_angle_deg:
                return None  # as a real detector misses a face turned away
            pts = true_landmarks_2d(truth, f, cameras[job])
            rng = np.random.default_rng([int(f.folder), int(c)])
            return Landmarks(pts + rng.normal(0, lcfg.truth_noise_px, pts.shape), np.ones(68), 1.0)

        def from_image(job: tuple[int, int]) -> Landmarks | None:
            rel = f"images/{frames[job[0]].folder}/image_{cams[job[1]]}.jpg"
            bgr = decode_image(ctx.store.get_bytes(ctx.input_key("sample", rel)), rel)
            factor = min(1.0, lcfg.detect_size / max(bgr.shape[:2]))
            small = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) if factor < 1 else bgr
            lm = detector.detect(np.ascontiguousarray(small[..., ::-1]))
            if lm is None or lm.confidence.mean() < lcfg.min_confidence:
                return None
            return Landmarks(lm.points / factor, lm.confidence, lm.score)

        jobs = [(f, c) for f in range(len(frames)) for c in range(len(cams))]
        found: dict[tuple[int, int], Landmarks] = {}
        statuses: dict[str, dict[str, float | None]] = {f.folder: {} for f in frames}
        # Detection threads: dlib and torch release the GIL in their heavy parts.
        pool = io_pool if detector is None else ThreadPoolExecutor(len(os.sched_getaffinity(0)))
        try:
            for n, (job, lm) in enumerate(zip(jobs, pool.map(from_truth if detector is None else from_image, jobs),
                                              strict=True), 1):
                folder, cam = frames[job[0]].folder, cams[job[1]]
                statuses[folder][cam] = None if lm is None else round(lm.score, 4)
                if lm is not None:
                    found[job] = lm
                    ctx.outputs.put_bytes(f"landmarks/{folder}/lmk_{cam}.npy", _npy(lm.as_array()))
                if n % (len(cams) * 4) == 0 or n == len(jobs):
                    log.info("%s/fitting: landmarks in %d/%d images (%d faces)", ctx.capture, n, len(jobs), len(found))
        finally:
            if pool is not io_pool:
                pool.shutdown()
        ctx.outputs.put_bytes("landmarks/detections.json", json.dumps(
            {"detector": lcfg.detector, "score_of_found_face": statuses}, indent=1).encode())
        return found

    @staticmethod
    def _score_detection(found: dict[tuple[int, int], Landmarks], frames: list[Frame], cams: list[str],
                         cameras: dict[tuple[int, int], Camera], truth: dict[str, dict]) -> dict[str, float]:
        if not found:
            return {}
        errors = [np.linalg.norm(lm.points - true_landmarks_2d(truth, frames[f], cameras[(f, c)]), axis=1).mean()
                  for (f, c), lm in found.items()]
        return {"detection_error_px_mean": float(np.mean(errors)), "detection_error_px_max": float(np.max(errors))}

    # --- pictures ------------------------------------------------------------------------------

    def _overlays(self, ctx: StageContext, frames: list[Frame], cams: list[str],
                  cameras: dict[tuple[int, int], Camera], keep: np.ndarray,
                  found: dict[tuple[int, int], Landmarks], result: Fit, model: MorphableModel) -> None:
        n = ctx.config.landmarks.overlay_frames
        if not n:
            return
        picks = sorted({round(float(x)) for x in np.linspace(0, len(keep) - 1, min(n, len(keep)))})
        size = ctx.config.extract.output_size
        s = THUMB / size
        for k in picks:
            i = int(keep[k])
            folder = frames[i].folder
            lm_tiles, fit_tiles = [], []
            verts = result.vertices(model, k)
            for j, cam in enumerate(cams):
                rel = f"images/{folder}/image_{cam}.jpg"
                img = cv2.resize(decode_image(ctx.store.get_bytes(ctx.input_key("sample", rel)), rel), (THUMB, THUMB))
                lm = found.get((i, j))
                lm_tiles.append(draw_landmarks(img.copy(), None if lm is None else lm.points * s, (80, 255, 80)))
                mesh2d = _project_np(verts, cameras[(i, j)]) * s
                tile = draw_mesh(img.copy(), mesh2d, model.faces)
                fit_tiles.append(draw_landmarks(tile, result.projected[k, j] * s, (60, 60, 255)))
            ctx.outputs.put_bytes(f"overlays/landmarks_{folder}.jpg", encode_jpg(contact_sheet(lm_tiles), 90))
            ctx.outputs.put_bytes(f"overlays/fit_{folder}.jpg", encode_jpg(contact_sheet(fit_tiles), 90))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _project_np(points: np.ndarray, cam: Camera) -> np.ndarray:
    p = (points @ cam.extrinsic[:, :3].T + cam.extrinsic[:, 3]) @ cam.intrinsic.T
    return p[:, :2] / np.maximum(p[:, 2:3], 1e-9)


def _truth_of(truth: dict[str, dict], frame: Frame) -> dict[str, np.ndarray]:
    seq = truth.get(frame.sequence)
    if seq is None or frame.video_frame >= len(seq["landmarks_3d"]):
        raise PipelineError(f"synthetic ground truth has no landmarks for {frame.sequence} frame {frame.video_frame}")
    return {k: v[frame.video_frame] if k in ("rotation", "translation", "landmarks_3d") else v for k, v in seq.items()}


def true_landmarks_2d(truth: dict[str, dict], frame: Frame, cam: Camera) -> np.ndarray:
    return _project_np(_truth_of(truth, frame)["landmarks_3d"], cam)


def face_angle_deg(truth: dict[str, dict], frame: Frame, cam: Camera) -> float:
    """Angle between where the true face points (model +z) and the direction to the camera."""
    t = _truth_of(truth, frame)
    forward = cv2.Rodrigues(t["rotation"].reshape(3, 1))[0][:, 2]
    centre = -cam.extrinsic[:, :3].T @ cam.extrinsic[:, 3]
    to_cam = centre - t["landmarks_3d"].mean(0)
    return float(np.rad2deg(np.arccos(np.clip(forward @ to_cam / np.linalg.norm(to_cam), -1, 1))))


def score_pose(result: Fit, frames: list[Frame], truth: dict[str, dict], model: MorphableModel) -> dict[str, float]:
    """Fitted vs true pose on a synthetic capture (the fit centres the model on its mean shape)."""
    centre = model.meanshape.mean(0)
    rot_err, trans_err = [], []
    for k, f in enumerate(frames):
        seq = truth[f.sequence]
        r_true = cv2.Rodrigues(seq["rotation"][f.video_frame].reshape(3, 1))[0]
        r_fit = cv2.Rodrigues(result.rotation[k].reshape(3, 1))[0]
        rot_err.append(np.rad2deg(np.linalg.norm(cv2.Rodrigues(r_fit.T @ r_true)[0])))
        t_true = seq["translation"][f.video_frame] + float(seq["scale"]) * r_true @ centre
        trans_err.append(np.linalg.norm(result.translation[k] - t_true))
    scale_true = float(next(iter(truth.values()))["scale"])
    return {"rotation_error_deg_max": float(np.max(rot_err)), "rotation_error_deg_mean": float(np.mean(rot_err)),
            "translation_error_mm_max": float(np.max(trans_err) * 1000),
            "scale_error_pct": float(abs(result.scale / scale_true - 1) * 100)}


def draw_landmarks(img: np.ndarray, points: np.ndarray | None, color: tuple[int, int, int]) -> np.ndarray:
    if points is None:  # no face: cross the tile out so the gap is seen, not missed
        h, w = img.shape[:2]
        cv2.line(img, (0, 0), (w - 1, h - 1), (0, 0, 255), 2)
        cv2.line(img, (0, h - 1), (w - 1, 0), (0, 0, 255), 2)
        return img
    for x, y in points:
        cv2.circle(img, (round(x), round(y)), 2, color, -1, cv2.LINE_AA)
    return img


def draw_mesh(img: np.ndarray, points: np.ndarray, faces: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    layer = img.copy()
    tris = np.round(points[faces]).astype(np.int32)
    cv2.polylines(layer, list(tris), True, (255, 200, 80), 1, cv2.LINE_AA)
    return cv2.addWeighted(layer, alpha, img, 1 - alpha, 0)


def contact_sheet(tiles: list[np.ndarray], cols: int = 4) -> np.ndarray:
    blank = np.zeros_like(tiles[0])
    tiles = tiles + [blank] * (-len(tiles) % cols)
    return np.vstack([np.hstack(tiles[r : r + cols]) for r in range(0, len(tiles), cols)])


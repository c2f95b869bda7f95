"""Scores of a benchmark submission against a synthetic capture's held-out truth, protocol ``PROTOCOL``.

The benchmark itself scores a submission on its server against hold-out videos nobody else has. A synthetic
capture has them: its hold-out cameras were recorded like the others, and its ground truth holds the head's
true alpha per frame and camera. So the same zip a user would upload is scored here the way the benchmark
describes it (each submitted 1100x1604 frame against the hold-out camera's recorded frame at that size, with
PSNR, SSIM and, where ``gaussianhead.lpips_weights`` is supplied, LPIPS-VGG), with one difference stated in the
protocol name: the recorded frame is matted with the true alpha onto black, because the avatar has no
background (``*_matte`` scores are inside the head only). A v2 capture's frames are colour-corrected first,
as stage 1 corrects the frames the avatar learned from. JOD (``headavatar.jod``: ColorVideoVDP) scores each
submitted video against the same matted recorded frames as one video, at the rig's 73 fps.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from headavatar.errors import PipelineError
from headavatar.gaussianhead.metrics import average, image_scores
from headavatar.imaging import decode_image
from headavatar.layout import ground_truth_prefix
from headavatar.nvs_submission import FPS, HEIGHT, HOLD_OUT_SERIALS, WIDTH, Request, video_name
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore
from headavatar.video import decode_frames

PROTOCOL = "headavatar-nvs-benchmark-matted/1"


def _resized(image: np.ndarray) -> np.ndarray:
    """To the benchmark's (HEIGHT, WIDTH): area averaging when shrinking, bilinear when enlarging."""
    smaller = image.shape[0] > HEIGHT
    return cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA if smaller else cv2.INTER_LINEAR)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255


def _submitted(zf: zipfile.ZipFile, name: str) -> list[np.ndarray]:
    import io

    import av

    with av.open(io.BytesIO(zf.read(name))) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def score_submission(store: ObjectStore, config: PipelineConfig, zip_path: Path,
                     requests: list[Request]) -> dict[str, Any]:
    """Mean scores over every submitted frame of ``requests`` (keys ``nvs_psnr``, ``nvs_ssim``,
    ``nvs_psnr_matte``, ``nvs_ssim_matte``, ``nvs_lpips``), with the protocol and frame count; and
    ``nvs_jod``, the mean JOD of the submitted videos, where the JOD environment exists (else
    ``jod_missing`` says why)."""
    from headavatar.color import ColorCorrection
    from headavatar.jod import PROTOCOL as JOD_PROTOCOL
    from headavatar.jod import JodPairs, jod_python
    from headavatar.raw import discover

    lpips = None
    rows = []
    python, jod_missing = jod_python()
    with tempfile.TemporaryDirectory(prefix="headavatar-nvs-scores-") as tmp, zipfile.ZipFile(zip_path) as zf:
        videos = JodPairs(Path(tmp) / "jod")
        if config.gaussianhead.lpips_weights:
            from headavatar.assets import fetch_asset
            from headavatar.gaussianhead.perceptual import LPIPSVGG

            lpips = LPIPSVGG().load(fetch_asset(store, config.gaussianhead.lpips_weights, "gaussianhead.lpips_weights",
                                                Path(tmp)), config.gaussianhead.lpips_weights)
        for r in requests:
            truth = ground_truth_prefix(r.capture)
            if not any(True for _ in store.list(store.key(truth, r.sequence, "alpha"))):
                raise PipelineError(f"{r.capture}: no synthetic ground truth for {r.sequence} under "
                                    f"{store.uri(store.key(truth))}: only synthetic captures can be scored here")
            raw = discover(store, r.capture, config)
            parts = [s for s in raw.sequences if s.name == r.sequence]
            if len(parts) != 1:
                raise PipelineError(f"{r.capture}: scoring needs {r.sequence} as one video per camera, "
                                    f"found {len(parts)} parts")
            correct = config.extract.color_correction and raw.color_matrices is not None
            for serial in HOLD_OUT_SERIALS:
                obj = parts[0].videos.get(serial)
                if obj is None:
                    raise PipelineError(f"{r.capture}: no recorded video of hold-out camera {serial} in {r.sequence}")
                local = store.download_file(obj.key, Path(tmp) / f"{serial}.mp4")
                submitted = _submitted(zf, video_name(r.participant, r.sequence, serial))
                recorded = dict(decode_frames(str(local), set(range(len(submitted))), store.uri(obj.key)))
                color = ColorCorrection(raw.color_matrices[serial]) if correct else None  # type: ignore[index]
                truths = []
                for k, pred in enumerate(submitted):
                    bgr = color(recorded[k]) if color else recorded[k]
                    key = store.key(truth, r.sequence, "alpha", f"{k:04d}", f"cam_{serial}.png")
                    alpha = decode_image(store.get_bytes(key), store.uri(key))
                    alpha = _resized(alpha if alpha.ndim == 2 else alpha[..., 0]).astype(np.float32) / 255
                    gt = _resized(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).astype(np.float32) * alpha[..., None]
                    matte = torch.from_numpy(alpha)
                    truths.append(gt.round().astype(np.uint8))
                    rows.append(image_scores(_tensor(pred), _tensor(truths[-1]), matte, lpips))
                if python is not None:
                    videos.add(np.stack(submitted), np.stack(truths))
        jod = {"jod_missing": jod_missing or "no video to score"}
        if python is not None and videos.count:
            scores = videos.score(python, FPS)
            jod = {"nvs_jod": sum(scores) / len(scores), "jod_videos": len(scores), "jod_protocol": JOD_PROTOCOL}
    return {"protocol": PROTOCOL, "frames": len(rows), **average(rows, "nvs"), **jod}

"""The straightforward preprocessing, as the Gaussian Head Avatar reference script does it.

Used as ground truth by the equality tests and as the baseline of ``make bench``: decode every
frame to BGR, pad + crop + resize + write every ``extract_stride``-th frame at full size (image,
low-res image, visible mask, low-res mask, camera npz), then copy every ``sample_stride``-th
frame folder. Single process, local disk, sequences in sorted order (the one deliberate
difference from the original, whose glob order was not deterministic).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from headavatar.layout import BACKGROUND_SEQUENCE
from headavatar.settings import PipelineConfig, sequence_selected


def pad_crop(image: np.ndarray, left: int, top: int, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    pad = ((max(0, -top), max(0, top + size - h)), (max(0, -left), max(0, left + size - w)), (0, 0))
    padded = np.pad(image, pad)
    y, x = max(top, 0), max(left, 0)
    return padded[y : y + size, x : x + size]


def _crop_resize(image: np.ndarray, cfg: PipelineConfig) -> np.ndarray:
    e = cfg.extract
    return cv2.resize(pad_crop(image, e.crop_left, e.crop_top, e.crop_size), (e.output_size, e.output_size))


def reference_extract(raw_root: Path, capture: str, out: Path, cfg: PipelineConfig,
                      correct: Callable[[np.ndarray, str], np.ndarray] | None = None) -> Path:
    """``correct(bgr, camera)``: the v2 colour correction, applied to each whole frame and plate first."""
    e = cfg.extract
    v2 = raw_root / "v2" / capture  # NeRSemble v2 participant folder (headavatar.layout)
    params = v2 / "calibration" if v2.is_dir() else raw_root / "camera_params" / capture
    camera = json.loads((params / "camera_params.json").read_text())
    intr = np.array(camera["intrinsics"], dtype=np.float64)
    intr[0:2, 2] -= (e.crop_left, e.crop_top)
    intr[0, :] *= e.output_size / e.crop_size
    intr[1, :] *= e.output_size / e.crop_size
    lowres = (e.lowres_size, e.lowres_size)
    sel = cfg.capture
    if v2.is_dir():
        folders = sorted(p / "images" for p in (v2 / "sequences").iterdir() if p.name != "BACKGROUND"
                         and sequence_selected(p.name, sel.include_sequences, sel.exclude_sequences))
        plates = v2 / "sequences" / "BACKGROUND"
    else:
        folders = [p for p in raw_root.glob(f"sequence_*/{capture}/*") if p.is_dir() and p.name != "BACKGROUND"
                   and sequence_selected(p.name, sel.include_sequences, sel.exclude_sequences)]
        folders.sort(key=lambda p: (p.name, int(p.parts[-3].rsplit("-", 1)[1])))  # (sequence, part)
        plates = raw_root / BACKGROUND_SEQUENCE / capture / "BACKGROUND"
    fix = correct or (lambda image, _cam: image)
    for cam in cfg.capture.cameras:
        bg = fix(cv2.imread(str(plates / f"image_{cam}.jpg")), cam)
        (out / "background").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "background" / f"image_{cam}.jpg"), _crop_resize(bg, cfg))
        extrinsic = np.array(camera["world_2_cam"][cam][:3])
        fid = 0
        for folder in folders:
            cap = cv2.VideoCapture(str(folder / f"cam_{cam}.mp4"))
            count = -1
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                count += 1
                if count % e.frame_stride:
                    continue
                image = _crop_resize(fix(frame, cam), cfg)
                visible = _crop_resize(np.full_like(frame, 255), cfg)
                d = out / "images" / f"{fid:04d}"
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"image_{cam}.jpg"), image)
                cv2.imwrite(str(d / f"image_lowres_{cam}.jpg"), cv2.resize(image, lowres))
                cv2.imwrite(str(d / f"visible_{cam}.jpg"), visible)
                cv2.imwrite(str(d / f"visible_lowres_{cam}.jpg"), cv2.resize(visible, lowres))
                c = out / "cameras" / f"{fid:04d}"
                c.mkdir(parents=True, exist_ok=True)
                np.savez(c / f"camera_{cam}.npz", extrinsic=extrinsic, intrinsic=intr)
                fid += 1
            cap.release()
    return out


def dataset_color_correction(raw_root: Path, capture: str) -> Callable[[np.ndarray, str], np.ndarray]:
    """The dataset authors' procedure with colour-science (float64, whole frame): ``correct(bgr, camera)``."""
    import colour
    from colour.characterisation import matrix_augmented_Cheung2004

    doc = json.loads((raw_root / "v2" / capture / "calibration" / "color_calibration.json").read_text())

    def correct(bgr: np.ndarray, cam: str) -> np.ndarray:
        ccm = np.asarray(doc[cam], dtype=np.float64)
        linear = colour.cctf_decoding(bgr[..., ::-1] / 255.0).reshape(-1, 3)
        rgb = (ccm @ matrix_augmented_Cheung2004(linear, ccm.shape[1]).T).T.reshape(bgr.shape)
        return np.ascontiguousarray(np.clip(colour.cctf_encoding(rgb) * 255, 0, 255).astype(np.uint8)[..., ::-1])

    return correct


def reference_sample(extracted: Path, out: Path, cfg: PipelineConfig) -> Path:
    stride = cfg.sample.frame_stride
    shutil.copytree(extracted / "background", out / "background", dirs_exist_ok=True)
    for kind in ("images", "cameras"):
        for d in sorted((extracted / kind).iterdir()):
            if int(d.name) % stride == 0:
                shutil.copytree(d, out / kind / d.name, dirs_exist_ok=True)
    return out

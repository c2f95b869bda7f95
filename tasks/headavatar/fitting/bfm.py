"""The Basel Face Model 2009 file structure (``BFM09_model_info.mat``), read and written.

The real model's licence forbids shipping it, so users supply it; the synthetic capture writes a
small model in the same structure. Keys: ``meanshape`` (1, 3N), ``idBase`` (3N, K_id), ``exBase``
(3N, K_exp), ``tri`` (F, 3) and ``keypoints`` (68,), both 1-based; optional ``uv`` (N, 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import loadmat, savemat

from headavatar.errors import ConfigError

BFM_INSTRUCTIONS = (
    "BFM09_model_info.mat is not shipped (its licence forbids it): request the Basel Face Model 2009 at "
    "https://faces.dmi.unibas.ch/bfm/, build BFM09_model_info.mat as Deep3DFaceRecon describes, upload it and "
    "set fitting.face_model=s3://<bucket>/<key> (or a local path)"
)


@dataclass(frozen=True)
class MorphableModel:
    meanshape: np.ndarray  # (N, 3) model units (mm for BFM09)
    id_base: np.ndarray  # (N*3, K_id)
    exp_base: np.ndarray  # (N*3, K_exp)
    faces: np.ndarray  # (F, 3) 0-based
    keypoints: np.ndarray  # (68,) 0-based vertex indices, iBUG-68 order
    uv: np.ndarray  # (N, 2) texture coordinates where the file has them, else zeros

    def shape(self, id_coeff: np.ndarray, exp_coeff: np.ndarray) -> np.ndarray:
        """Vertices in model space for the given coefficients."""
        offset = self.id_base @ id_coeff + self.exp_base @ exp_coeff
        return self.meanshape + offset.reshape(-1, 3)

    def save_mat(self, path: Path) -> None:
        n = len(self.meanshape)
        savemat(path, {
            "meanshape": self.meanshape.reshape(1, -1),
            "idBase": self.id_base,
            "exBase": self.exp_base,
            "meantex": np.full((1, n * 3), 180.0),
            "texBase": np.zeros((n * 3, 1)),
            "tri": self.faces + 1,
            "keypoints": (self.keypoints + 1).reshape(1, -1),
            "uv": self.uv,
        }, do_compression=True)

    @classmethod
    def load_mat(cls, path: Path, name: str | None = None) -> MorphableModel:
        """Load and check the structure; any problem is a one-line ConfigError naming the file."""
        name = name or str(path)
        try:
            m = loadmat(path)
        except FileNotFoundError:
            raise ConfigError(f"face model not found: {name}. {BFM_INSTRUCTIONS}") from None
        except Exception as e:  # scipy raises several types for non-.mat content
            raise ConfigError(f"face model {name} is not a readable .mat file ({type(e).__name__})") from None
        missing = [k for k in ("meanshape", "idBase", "exBase", "tri", "keypoints") if k not in m]
        if missing:
            raise ConfigError(f"face model {name} lacks {', '.join(missing)} (expected BFM09_model_info.mat keys)")
        mean = np.asarray(m["meanshape"], np.float64).reshape(-1)
        n = mean.size // 3
        id_base, exp_base = np.asarray(m["idBase"], np.float64), np.asarray(m["exBase"], np.float64)
        faces = np.asarray(m["tri"], np.int64) - 1
        keypoints = np.asarray(m["keypoints"], np.int64).reshape(-1) - 1
        problems = []
        if mean.size % 3 or n < 68:
            problems.append(f"meanshape has {mean.size} values")
        if id_base.ndim != 2 or id_base.shape[0] != mean.size:
            problems.append(f"idBase shape {id_base.shape} does not match meanshape ({mean.size})")
        if exp_base.ndim != 2 or exp_base.shape[0] != mean.size:
            problems.append(f"exBase shape {exp_base.shape} does not match meanshape ({mean.size})")
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= n:
            problems.append("tri is not (F, 3) 1-based vertex indices")
        if keypoints.shape != (68,) or keypoints.min() < 0 or keypoints.max() >= n:
            problems.append("keypoints is not 68 1-based vertex indices")
        if problems:
            raise ConfigError(f"face model {name}: {'; '.join(problems)}")
        uv = np.asarray(m["uv"], np.float64) if "uv" in m else np.zeros((n, 2))
        return cls(mean.reshape(n, 3), id_base, exp_base, faces, keypoints, uv)

"""The animated avatar page's data (quantised per-frame Gaussians in a camera's frame) decoded as the page's
script decodes it, and the page's script rebuilt from its npm lock file. The page in Chromium:
tests/test_export.py (frames, orbiting) and tests/test_ui.py (served by `make demo-ui`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from headavatar.render.gaussian_raster import Splats
from headavatar.web_viewer import BUNDLE, BYTES_PER_GAUSSIAN, _quaternion, pack_sequence, viewer_page


def decode(meta: dict, blob: bytes, f: int) -> dict[str, np.ndarray]:
    """Frame ``f`` as web/viewer.js decodes it (the format of headavatar.web_viewer)."""
    n = meta["count"]
    base = f * BYTES_PER_GAUSSIAN * n
    pos = np.frombuffer(blob, "<u2", 3 * n, base).reshape(n, 3)
    rot = np.frombuffer(blob, np.int8, 4 * n, base + 6 * n).reshape(n, 4).astype(np.float64)
    scl = np.frombuffer(blob, np.uint8, 3 * n, base + 10 * n).reshape(n, 3)
    rgba = np.frombuffer(blob, np.uint8, 4 * n, base + 13 * n).reshape(n, 4)
    lo, hi = np.array(meta["position_min"]), np.array(meta["position_max"])
    smin, smax = meta["log_scale_min"], meta["log_scale_max"]
    return {"positions": lo + pos / 65535 * (hi - lo), "rotations": rot / np.linalg.norm(rot, axis=1, keepdims=True),
            "scales": np.exp(smin + scl / 255 * (smax - smin)), "rgba": rgba}


def test_camera_rotations_become_the_same_quaternions_as_scipys() -> None:
    rng = np.random.default_rng(0)
    matrices = [*Rotation.random(50, random_state=1).as_matrix(), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]),
                np.diag([-1.0, -1, 1]), Rotation.from_rotvec(np.pi * rng.normal(size=3) / 2).as_matrix()]
    for m in matrices:
        q = _quaternion(m)
        ref = Rotation.from_matrix(m).as_quat()[[3, 0, 1, 2]]  # scipy: x, y, z, w
        assert min(np.abs(q - ref).max(), np.abs(q + ref).max()) < 1e-9, m


def test_the_packed_sequence_decodes_to_the_gaussians_in_the_cameras_frame() -> None:
    rng = np.random.default_rng(3)
    n, frames = 257, 4  # an odd count: the uint16 block of the next frame starts at an odd offset
    rot = Rotation.from_rotvec([0.3, -2.0, 0.5])
    world_to_cam = np.hstack([rot.as_matrix(), [[0.1], [-0.2], [1.1]]])
    splats = []
    for _ in range(frames):
        quats = torch.tensor(rng.normal(size=(n, 4)))
        splats.append(Splats(torch.tensor(rng.normal(0, 0.1, (n, 3))), quats,
                             torch.tensor(np.exp(rng.uniform(-7, -3, (n, 3)))), torch.tensor(rng.uniform(0, 1, n)),
                             torch.tensor(rng.uniform(0, 1, (n, 32)))))
    packed = pack_sequence(splats, world_to_cam)
    assert len(packed.frames) == frames * BYTES_PER_GAUSSIAN * n == frames * packed.meta["bytes_per_frame"]
    cams = [s.means.numpy() @ rot.as_matrix().T + world_to_cam[:, 3] for s in splats]
    centre = np.concatenate(cams).mean(0)
    assert packed.meta["camera_distance"] == pytest.approx(np.linalg.norm(centre))
    span = np.array(packed.meta["position_max"]) - np.array(packed.meta["position_min"])
    for f, s in enumerate(splats):
        d = decode(packed.meta, packed.frames, f)
        assert np.abs(d["positions"] - (cams[f] - centre)).max() <= span.max() / 65535
        step = (packed.meta["log_scale_max"] - packed.meta["log_scale_min"]) / 255
        assert np.abs(np.log(d["scales"]) - np.log(s.scales.numpy())).max() <= step / 2 + 1e-9
        # The Gaussian's orientation in the camera's frame: the camera's rotation times its own.
        expected = (rot * Rotation.from_quat(s.quats.numpy()[:, [1, 2, 3, 0]])).as_matrix()
        got = Rotation.from_quat(d["rotations"][:, [1, 2, 3, 0]]).as_matrix()
        assert np.abs(got - expected).max() < 0.03  # int8 components: about 1/127 each
        rgba = np.concatenate([s.colors[:, :3].numpy(), s.opacities.numpy()[:, None]], 1)
        assert np.abs(d["rgba"] / 255 - rgba).max() <= 0.5 / 255 + 1e-9
    page = viewer_page(packed, b"\0\0\0\x18ftypmp42", "t", 10, "notes")
    assert page.count("<script") == page.count("</script>") == 3  # meta, frames, the script: none cut short
    assert '"format": "headavatar-web-sequence/1"' in page and "data:video/mp4;base64," in page


def test_the_bundled_script_is_what_its_lock_file_builds(tmp_path: Path) -> None:
    """web/viewer.bundle.js is committed (stage images and pages need no npm); rebuilt here from
    package-lock.json (gsplat.js, esbuild) and viewer.js, it must come out byte for byte the same."""
    web = BUNDLE.parent
    for name in ("package.json", "package-lock.json", "viewer.js"):
        shutil.copy(web / name, tmp_path / name)
    npm = shutil.which("npm")
    assert npm, "npm is needed to rebuild the viewer script (Debian: apt-get install npm)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    subprocess.run([npm, "run", "build"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "viewer.bundle.js").read_bytes() == BUNDLE.read_bytes(), \
        "web/viewer.bundle.js is stale: run `npm ci && npm run build` in tasks/headavatar/web and commit it"

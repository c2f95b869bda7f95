"""The animated avatar in the browser: one self-contained HTML page (``avatar.html``).

The page holds the per-frame Gaussians of one sequence, quantised to 17 bytes per Gaussian and frame (position
3 x uint16 over the sequence's bounding box, rotation 4 x int8, log-scale 3 x uint8, RGB and opacity 4 x uint8),
the ground-truth video of that sequence from one camera, and the viewer script: gsplat.js (MIT, from npm)
with the player (``web/viewer.js``), bundled by esbuild into ``web/viewer.bundle.js``. Nothing is fetched at
run time, so the page works from a file, from MLflow's artifact store and from any static server.

What it shows is what a splat viewer can show: the coarse RGB of the Gaussians (the first three of their 32
channels), not the super-resolved image (docs/export.md). Positions are in the frame of the ground truth's
camera (x right, y down, z forward, as gsplat.js's orbit camera looks), centred on the head, so the page opens
with the avatar seen as that camera saw it.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from headavatar.render.gaussian_raster import Splats

if TYPE_CHECKING:
    from headavatar.gaussianhead.trainer import GaussianHeadTrainer

BUNDLE = Path(__file__).parent / "web" / "viewer.bundle.js"
BYTES_PER_GAUSSIAN = 17
FORMAT = "headavatar-web-sequence/1"


def _quaternion(m: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) -> unit quaternion (4,), w first (Shepperd: from the largest diagonal term)."""
    if np.trace(m) > 0:
        s = 2 * np.sqrt(1 + np.trace(m))
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2 * np.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2 * np.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2 * np.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def _multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions, w first: a (4,) times b (N, 4)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b.T
    return np.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], -1)


@dataclass(frozen=True)
class PackedSequence:
    meta: dict[str, Any]  # what the viewer needs to decode and frame the sequence
    frames: bytes  # frame after frame, BYTES_PER_GAUSSIAN * count bytes each


def pack_sequence(frames: list[Splats], world_to_cam: np.ndarray, focal: float | None = None) -> PackedSequence:
    """Each frame's Gaussians (N, the same N in every frame) moved into the camera ``world_to_cam`` (3, 4)
    with the head's centre at the origin, then quantised over the whole sequence's ranges. ``focal``: that
    camera's focal length over its image width, so the page opens framed as the camera saw the head."""
    rot, t = np.asarray(world_to_cam, np.float64)[:3, :3], np.asarray(world_to_cam, np.float64)[:3, 3]
    means = [f.means.detach().double().cpu().numpy() @ rot.T + t for f in frames]
    centre = np.concatenate(means).mean(0)
    means = [m - centre for m in means]
    lo, hi = np.min([m.min(0) for m in means], 0), np.max([m.max(0) for m in means], 0)
    hi = np.maximum(hi, lo + 1e-6)
    log_scales = [torch.log(f.scales.detach().double().clamp_min(1e-12)).cpu().numpy() for f in frames]
    smin, smax = float(min(s.min() for s in log_scales)), float(max(s.max() for s in log_scales))
    smax = max(smax, smin + 1e-6)
    q_cam = _quaternion(rot)
    chunks = []
    for f, m, s in zip(frames, means, log_scales, strict=True):
        q = _multiply(q_cam, torch.nn.functional.normalize(f.quats.detach().double(), dim=-1).cpu().numpy())
        rgba = np.concatenate([f.colors[:, :3].detach().double().cpu().numpy(),
                               f.opacities.detach().double().cpu().numpy()[:, None]], 1)
        chunks += [np.round((m - lo) / (hi - lo) * 65535).astype("<u2").tobytes(),
                   np.round(q * 127).clip(-127, 127).astype(np.int8).tobytes(),
                   np.round((s - smin) / (smax - smin) * 255).astype(np.uint8).tobytes(),
                   np.round(rgba.clip(0, 1) * 255).astype(np.uint8).tobytes()]
    n = len(frames[0].means)
    meta = {"format": FORMAT, "count": n, "frames": len(frames), "bytes_per_frame": BYTES_PER_GAUSSIAN * n,
            "position_min": lo.tolist(), "position_max": hi.tolist(), "log_scale_min": smin, "log_scale_max": smax,
            "camera_distance": float(np.linalg.norm(centre)), "focal": focal}
    return PackedSequence(meta, b"".join(chunks))


STYLE = """body{font:15px system-ui,sans-serif;margin:1.5em;background:#111;color:#eee}
.row{display:flex;gap:1em;flex-wrap:wrap}figure{margin:0}canvas,video{width:480px;height:480px;background:#000}
figcaption{color:#aaa;font-size:13px;margin-top:.3em}button{font-size:15px;padding:.3em 1.2em;margin:.8em .8em 0 0}
a{color:#8cf}"""


def viewer_page(packed: PackedSequence, truth_mp4: bytes | None, title: str, fps: float, notes: str) -> str:
    """The whole page: player, data, ground-truth video and bundled script inline."""
    if not BUNDLE.exists():
        raise FileNotFoundError(f"{BUNDLE} is missing: build it with `npm ci && npm run build` in {BUNDLE.parent}")
    script = BUNDLE.read_text().replace("</script", "<\\/script")
    meta = json.dumps({**packed.meta, "fps": fps, "title": title}).replace("</", "<\\/")  # stays in its <script>
    e = html.escape
    video = (f"<figure><video id=truth muted playsinline preload=auto src='data:video/mp4;base64,"
             f"{base64.b64encode(truth_mp4).decode()}'></video><figcaption>ground truth</figcaption></figure>"
             if truth_mp4 else "")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{e(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{e(title)}</h1><div class=row><figure><canvas id=avatar width=480 height=480>"
            f"</canvas><figcaption>avatar (coarse RGB of its Gaussians): drag to orbit, right-drag to pan, scroll "
            f"to zoom</figcaption></figure>{video}</div><button id=play>Pause</button><span id=frame></span>"
            f"<p>{e(notes)}</p>"
            f"<script type=application/json id=avatar-meta>{meta}</script>"
            f"<script type=application/octet-stream id=avatar-frames>{base64.b64encode(packed.frames).decode()}"
            f"</script><script>{script}</script></body></html>\n")


@torch.no_grad()
def avatar_page(trainer: GaussianHeadTrainer, title: str, sequence: str | None = None, fps: float = 10.0,
                size: int = 480, max_frames: int | None = None, max_bytes: int | None = None
                ) -> tuple[str, dict[str, Any]]:
    """The page of a trained avatar playing ``sequence`` (default: its held-out sequence, else the first
    trained one): every frame of it the avatar was fitted to (at most ``max_frames``, and at most as many as
    fit ``max_bytes`` of Gaussians; evenly spread), beside the ground truth from the first held-out camera
    (else the first camera). Returns the page and what it holds."""
    from headavatar.avatar_video import to_uint8, write_mp4
    from headavatar.errors import ConfigError
    from headavatar.posing import avatar_frames, posed_splats

    sets = [(trainer.coarse, trainer.fine, True)] + [(s.coarse, s.fine, False) for s in trainer.eval_sets
                                                      if not s.known_frames]
    held = [s for s in trainer.eval_sets if s.name == "self_reenactment"]
    names = {}
    for coarse, fine, known in sets:
        seqs = coarse.views.sequences or [""] * len(coarse.folders)
        for i, folder in enumerate(coarse.folders):
            names.setdefault(seqs[i], []).append((folder, coarse, fine, i, known))
    if sequence is None:
        sequence = held[0].coarse.views.sequences[0] if held and held[0].coarse.views.sequences else next(iter(names))
    if sequence not in names:
        raise ConfigError(f"no frame of sequence {sequence!r} in the avatar "
                          f"(its sequences: {', '.join(sorted(names))})")
    chosen = sorted(names[sequence], key=lambda r: r[0])
    limit = max_frames or len(chosen)
    if max_bytes is not None:
        limit = min(limit, max(2, max_bytes // (BYTES_PER_GAUSSIAN * len(trainer.head.xyz))))
    if len(chosen) > limit:
        chosen = [chosen[round(i * (len(chosen) - 1) / (limit - 1))] for i in range(limit)]
    frames = avatar_frames(trainer)
    cam = trainer.held_cams[0] if trainer.held_cams else 0
    splats = [posed_splats(trainer, *frames[folder]) for folder, *_ in chosen]
    fine = trainer.fine
    packed = pack_sequence(splats, trainer.coarse.E[0, cam].cpu().numpy(), float(fine.K[0, cam, 0, 0]) / fine.size)
    truth_frames = []
    for _, coarse, fine, i, _ in chosen:
        t = trainer.targets(i, cam, coarse, fine)
        truth_frames.append(to_uint8(t["fine"] * t["fine_visible"], size))
    with tempfile.TemporaryDirectory(prefix="headavatar-viewer-") as tmp:
        path = Path(tmp) / "truth.mp4"
        write_mp4(truth_frames, path, fps=max(1, round(fps)))
        truth = path.read_bytes()
    camera = trainer.coarse.cameras[cam]
    notes = (f"Sequence {sequence}, {len(chosen)} frames at {fps:g} fps; ground truth and the opening view from "
             f"camera {camera}. The avatar is shown as a splat viewer shows it: the coarse RGB of its "
             f"{packed.meta['count']} Gaussians, without the super-resolution network of stage 6.")
    page = viewer_page(packed, truth, title, fps, notes)
    return page, {**packed.meta, "sequence": sequence, "camera": camera, "fps": fps, "bytes": len(page.encode()),
                  "truth_bytes": len(truth)}

"""Mesh-head training: losses of the reference trainer, held-out evaluation, resumable state."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from headavatar.errors import PipelineError
from headavatar.fitting.geometry import axis_angle_to_matrix, project
from headavatar.meshhead.model import MeshHead, compiled, laplacian, vertex_normals
from headavatar.render.mesh_raster import MeshRasterizer
from headavatar.settings import MeshHeadConfig
from headavatar.training.device_data import DeviceViews
from headavatar.training.loop import Trainer, make_optimizer
from headavatar.training.plateau import PlateauRule
from headavatar.training.views import Views

log = logging.getLogger(__name__)


def init_model(cfg: MeshHeadConfig, views: Views, vertices: np.ndarray) -> MeshHead:
    """Box and initial ellipsoid from the fitted 3DMM vertices, brought into canonical space."""
    rot = axis_angle_to_matrix(torch.tensor(views.pose[0, :3], dtype=torch.float64)).numpy()
    canonical = (vertices - views.pose[0, 3:]) @ rot / views.scale
    lo, hi = canonical.min(0), canonical.max(0)
    center = (lo + hi) / 2
    half = (hi - lo) / 2 * cfg.bbox_margin
    rots = axis_angle_to_matrix(torch.tensor(views.pose[:, :3], dtype=torch.float64)).numpy()
    lmk = np.einsum("fpj,fjk->fpk", views.landmarks_3d - views.pose[:, None, 3:], rots) / views.scale
    landmarks = (lmk.mean(0) - center) / half
    ellipsoid = (hi - lo) / 2 / half
    return MeshHead(cfg, views.exp.shape[1], torch.tensor(center), torch.tensor(half), torch.tensor(ellipsoid),
                    torch.tensor(landmarks))


@dataclass
class Rendered:
    rgb: torch.Tensor  # (B, S, S, 3)
    alpha: torch.Tensor  # (B, S, S)
    normals: torch.Tensor | None  # (B, S, S, 3) camera space, 0 where no face (when asked for)
    hit: torch.Tensor  # (B, S, S) a face covers the pixel centre
    verts: torch.Tensor  # neutral, box units
    faces: torch.Tensor
    grid_deform: torch.Tensor
    offsets: torch.Tensor  # (B, M, 3)
    landmark_sdf: torch.Tensor  # (68,) SDF at the neutral landmarks
    landmark_offsets: torch.Tensor  # (B, 68, 3) their expression/pose offsets


def render(model: MeshHead, raster: MeshRasterizer, batch: dict[str, torch.Tensor], size: int,
           normals: bool = False) -> Rendered:
    """The batch's views of the posed mesh head; the landmarks ride along in the same MLP passes."""
    verts, faces, grid_deform, landmark_sdf = model.neutral_and_landmark_sdf()
    if len(faces) == 0:
        raise PipelineError("the mesh head has no surface (SDF without a zero crossing); lower the learning rate")
    _, _, feats = model.query(verts)
    b, m = len(batch["exp"]), len(verts)
    points = torch.cat([verts, model.landmarks]).expand(b, -1, -1)
    both = model.offsets(points, batch["exp"], batch["pose"])
    offsets = both[:, :m]
    canonical = model.to_canonical(verts + offsets)
    rot = axis_angle_to_matrix(batch["pose"][:, :3])
    world = batch["scale"] * canonical @ rot.transpose(-1, -2) + batch["pose"][:, None, 3:]
    cam = world @ batch["E"][:, :3, :3].transpose(-1, -2) + batch["E"][:, None, :3, 3]
    pix = project(world, batch["K"], batch["E"])
    attrs = model.colors(verts, feats, batch["exp"])
    if normals:
        attrs = torch.cat([attrs, vertex_normals(cam, faces)], -1)
    out = raster(pix, cam[..., 2], faces, attrs, size, size)
    return Rendered(out.attributes[..., :3] * out.alpha[..., None], out.alpha,
                    out.attributes[..., 3:] if normals else None, out.face_index >= 0, verts, faces, grid_deform,
                    offsets, landmark_sdf, both[:, m:])


def soft_iou_loss(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    inter = (alpha * mask).sum((-1, -2))
    union = (alpha + mask - alpha * mask).sum((-1, -2)).clamp_min(1e-6)
    return (1 - inter / union).mean()


def hard_iou(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    p, g = alpha > 0.5, mask > 0.5
    return (p & g).sum((-1, -2)).float() / (p | g).sum((-1, -2)).clamp_min(1).float()


def losses(model: MeshHead, raster: MeshRasterizer, batch: dict[str, torch.Tensor], size: int,
           cfg: MeshHeadConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r = render(model, raster, batch, size)
    vis = batch["visible"]
    gt = batch["image"] * batch["mask"][..., None]
    loss_rgb = (torch.abs(r.rgb - gt) * vis[..., None]).mean()
    loss_sil = soft_iou_loss(r.alpha * vis, batch["mask"] * vis)
    # Landmarks: expression-deformed neutral landmarks vs the fitted ones brought to the box.
    rot = axis_angle_to_matrix(batch["pose"][:, :3])
    target = model.to_box((batch["landmarks_3d"] - batch["pose"][:, None, 3:]) @ rot / batch["scale"])
    loss_def = ((model.landmarks + r.landmark_offsets - target) ** 2).mean()
    loss_lmk = r.landmark_sdf.abs().mean()
    loss_offset = (r.offsets**2).sum(-1).mean() + (r.grid_deform**2).sum(-1).mean()
    loss_lap = compiled(laplacian, model.compile and r.verts.is_cuda)(r.verts, r.faces)
    total = (cfg.w_rgb * loss_rgb + cfg.w_silhouette * loss_sil + cfg.w_landmark_deform * loss_def
             + cfg.w_landmark_sdf * loss_lmk + cfg.w_offset * loss_offset + cfg.w_laplacian * loss_lap)
    parts = {"loss": total, "rgb": loss_rgb, "silhouette": loss_sil, "landmark_deform": loss_def,
             "landmark_sdf": loss_lmk, "offset": loss_offset, "laplacian": loss_lap}
    return total, {k: v.detach() for k, v in parts.items()}


class MeshHeadTrainer(Trainer):
    name = "meshhead"

    def __init__(self, model: MeshHead, views: Views, cfg: MeshHeadConfig, raster: MeshRasterizer,
                 device: torch.device):
        super().__init__(cfg.seed)
        self.model, self.views, self.cfg, self.raster, self.device = model.to(device), views, cfg, raster, device
        self.data = DeviceViews(views, device)
        self.amp = getattr(cfg, "precision", "fp32") == "bf16"
        model.amp = self.amp
        model.compile = getattr(cfg, "compile", False) and torch.device(device).type == "cuda"
        if hasattr(raster, "compile"):
            raster.compile = model.compile
        net = [p for n, p in model.named_parameters() if n != "landmarks"]
        self.opt = make_optimizer([{"params": net, "lr": cfg.lr_net},
                                   {"params": [model.landmarks], "lr": cfg.lr_landmarks}], device)
        held = set(views.camera_index(cfg.holdout_cameras))
        self.train_cams = [c for c in range(len(views.cameras)) if c not in held]
        self.held_cams = sorted(held)
        if not self.train_cams:
            raise PipelineError("meshhead.holdout_cameras leaves no camera to train on")
        self.plateau = PlateauRule.of(cfg, "holdout_psnr") if self.held_cams else None

    def compiling(self) -> bool:
        return self.model.compile

    def stop_compiling(self) -> None:
        self.model.compile = False
        if hasattr(self.raster, "compile"):
            self.raster.compile = False

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def batch(self, frames: torch.Tensor, cams: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.data.batch(frames, cams)

    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.cfg.views_per_step
        frames = torch.randint(len(self.views.folders), (n,), generator=self.gen)
        cams = torch.tensor(self.train_cams)[torch.randint(len(self.train_cams), (n,), generator=self.gen)]
        return losses(self.model, self.raster, self.batch(frames, cams), self.views.size, self.cfg)

    @torch.no_grad()
    def holdout_scores(self, cams: list[int]) -> dict[str, float]:
        """Over the given cameras and every frame: mean silhouette IoU (matte > 0.5 vs render > 0.5) and
        mean per-view PSNR of the rendered colours against the image x matte (both on black, x visibility)."""
        if not cams:
            return {"iou": float("nan"), "psnr": float("nan")}
        ious, psnrs = [], []
        pairs = [(f, c) for f in range(len(self.views.folders)) for c in cams]
        for s in range(0, len(pairs), 8):
            f, c = (torch.tensor(x) for x in zip(*pairs[s : s + 8], strict=True))
            b = self.batch(f, c)
            r = render(self.model, self.raster, b, self.views.size)
            vis = b["visible"]
            ious.append(hard_iou(r.alpha * vis, b["mask"] * vis).cpu())
            gt = b["image"] * b["mask"][..., None]
            mse = (((r.rgb.float().clamp(0, 1) - gt) * vis[..., None]) ** 2).mean((1, 2, 3))
            psnrs.append((-10 * torch.log10(mse.clamp_min(1e-10))).cpu())
        return {"iou": float(torch.cat(ious).mean()), "psnr": float(torch.cat(psnrs).mean())}

    def silhouette_iou(self, cams: list[int]) -> float:
        return self.holdout_scores(cams)["iou"]

    def evaluate(self) -> dict[str, float]:
        return {f"holdout_{k}": v for k, v in self.holdout_scores(self.held_cams).items()}

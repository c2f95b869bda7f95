"""Gaussian-head training: coarse 32-channel splat -> super-resolution, reference losses, held-out metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headavatar.errors import PipelineError
from headavatar.gaussianhead.model import GaussianHead, SuperResolution
from headavatar.gaussianhead.perceptual import Perceptual, psnr, ssim
from headavatar.render.gaussian_raster import GaussianRasterizer
from headavatar.settings import GaussianHeadConfig
from headavatar.training.loop import Trainer
from headavatar.training.views import Views


class GaussianHeadTrainer(Trainer):
    name = "gaussianhead"

    def __init__(self, head: GaussianHead, sr: SuperResolution, coarse: Views, fine: Views, cfg: GaussianHeadConfig,
                 raster: GaussianRasterizer, perceptual: Perceptual, device: torch.device):
        super().__init__(cfg.seed)
        self.head, self.sr = head.to(device), sr.to(device)
        self.coarse, self.fine, self.cfg, self.raster, self.perceptual = coarse, fine, cfg, raster, perceptual
        self.device = device
        net = [p for n, p in head.named_parameters() if n != "delta_pose"] + list(sr.parameters())
        groups = [{"params": net, "lr": cfg.lr_net}]
        if cfg.lr_pose > 0:
            groups.append({"params": [head.delta_pose], "lr": cfg.lr_pose})
        else:
            head.delta_pose.requires_grad_(False)
        self.opt = torch.optim.Adam(groups)
        held = set(coarse.camera_index(cfg.holdout_cameras))
        self.train_cams = [c for c in range(len(coarse.cameras)) if c not in held]
        self.held_cams = sorted(held)
        if not self.train_cams:
            raise PipelineError("gaussianhead.holdout_cameras leaves no camera to train on")
        self.scale = torch.tensor(coarse.scale, device=device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"head": self.head, "sr": self.sr}

    def _tensor(self, a: object) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32, device=self.device)

    def render(self, frame: int, cam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse features (C, h, w) and the super-resolved RGB (3, H, W)."""
        v = self.coarse
        splats = self.head.splats(self._tensor(v.exp[frame]), self._tensor(v.pose[frame]), self.scale, frame)
        view = torch.eye(4, device=self.device)
        view[:3] = self._tensor(v.extrinsics[frame, cam])
        img, _ = self.raster(splats, view, self._tensor(v.intrinsics[frame, cam]), v.size, v.size, with_alpha=False)
        feats = img.permute(2, 0, 1)
        return feats, self.sr(feats[None])[0]

    def targets(self, frame: int, cam: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in (("coarse", self.coarse), ("fine", self.fine)):
            b = v.tensors(torch.tensor([frame]), torch.tensor([cam]), self.device)
            out[name] = (b["image"][0] * b["mask"][0, ..., None]).permute(2, 0, 1)
            out[f"{name}_visible"] = b["visible"][0][None]
        return out

    def losses(self, frame: int, cam: int) -> tuple[torch.Tensor, dict[str, float]]:
        feats, sr = self.render(frame, cam)
        t = self.targets(frame, cam)
        vc, vf = t["coarse_visible"], t["fine_visible"]
        low = F.l1_loss(feats[:3] * vc, t["coarse"] * vc)
        high = F.l1_loss(sr * vf, t["fine"] * vf)
        perc = self.perceptual.loss((sr * vf)[None], (t["fine"] * vf)[None])
        cfg = self.cfg
        total = cfg.w_rgb_low * low + cfg.w_rgb_high * high + cfg.w_perceptual * perc
        return total, {"loss": float(total.detach()), "rgb_low": float(low.detach()), "rgb_high": float(high.detach()),
                       "perceptual": float(perc.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """PSNR / SSIM (/ LPIPS) of the super-resolved image on held-out cameras over all frames."""
        if not self.held_cams:
            return {}
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
        for f in range(len(self.coarse.folders)):
            for c in self.held_cams:
                _, sr = self.render(f, c)
                t = self.targets(f, c)
                a, b = (sr.clamp(0, 1) * t["fine_visible"])[None], (t["fine"] * t["fine_visible"])[None]
                scores["psnr"].append(float(psnr(a, b)[0]))
                scores["ssim"].append(float(ssim(a, b)[0]))
                if self.perceptual.lpips is not None:
                    scores["lpips"].append(float(self.perceptual.lpips(a, b)[0]))
        return {f"holdout_{k}": sum(v) / len(v) for k, v in scores.items() if v}

    def step_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.cfg.views_per_step
        frames = torch.randint(len(self.coarse.folders), (n,), generator=self.gen)
        cams = torch.randint(len(self.train_cams), (n,), generator=self.gen)
        total, parts_sum = 0.0, {}
        for f, c in zip(frames.tolist(), cams.tolist(), strict=True):
            loss, parts = self.losses(f, self.train_cams[c])
            total = total + loss / n
            parts_sum = {k: parts_sum.get(k, 0.0) + v / n for k, v in parts.items()}
        return total, parts_sum

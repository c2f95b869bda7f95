"""Gaussian-head training: coarse 32-channel splat -> super-resolution, reference losses, held-out metrics.

On CUDA the step is built not to wait for the host: views live on the device (``DeviceViews``),
loss terms stay tensors, the optimiser is fused, and with ``precision: bf16`` the MLPs and the
super-resolution CNN run under bf16 autocast while the rasteriser, the losses and SSIM stay fp32.
With ``compile`` (CUDA) the Gaussians' MLPs and, separately, super-resolution + losses run as
``torch.compile`` graphs; the rasteriser between them stays eager (gsplat reads a size back to the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headavatar.errors import PipelineError
from headavatar.gaussianhead.metrics import EvalSet, average, image_scores
from headavatar.gaussianhead.model import GaussianHead, SuperResolution
from headavatar.gaussianhead.perceptual import Perceptual
from headavatar.render.gaussian_raster import GaussianRasterizer, Splats
from headavatar.settings import GaussianHeadConfig
from headavatar.training.data_parallel import gather, rank_and_world, shard
from headavatar.training.device_data import DeviceViews
from headavatar.training.loop import Trainer, make_optimizer
from headavatar.training.plateau import PlateauRule
from headavatar.training.views import Views

# Inductor's options for super-resolution + losses. Inductor keeps a training graph NCHW when one of its
# convolutions has less than half as many output as input channels (the last layer, 32 -> 3): cuDNN then
# transposes the bf16 activations to NHWC and back around every convolution (4.2 ms of a 17 ms step on an
# H200, benchmarks/results/stage6_throughput_gpu.json). Forcing its layout optimisation keeps them channels-last.
COMPILE_OPTIONS = {"force_layout_optimization": True}


class StepViews(torch.nn.Module):
    """One rank's views of a training step as one module call: what DistributedDataParallel wraps so
    it can average the gradients of the head and the super-resolution net over the ranks."""

    def __init__(self, trainer: GaussianHeadTrainer):
        super().__init__()
        self.head, self.sr = trainer.head, trainer.sr
        self._losses = trainer.losses  # a bound method, not a submodule

    def forward(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss (and loss terms) of the views ``pairs`` (frame, camera)."""
        n = len(pairs)
        total: torch.Tensor | float = 0.0
        parts_sum: dict[str, torch.Tensor] = {}
        for f, c in pairs:
            loss, parts = self._losses(f, c)
            total = total + loss / n
            parts_sum = {k: parts_sum.get(k, 0.0) + v / n for k, v in parts.items()}
        assert isinstance(total, torch.Tensor)
        return total, parts_sum


def matted(image: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A view's target: image (S, S, 3) x matte (S, S) as (3, S, S) on black, and visibility as (1, S, S)."""
    return (image * mask[..., None]).permute(2, 0, 1), visible[None]


class GaussianHeadTrainer(Trainer):
    name = "gaussianhead"

    def __init__(self, head: GaussianHead, sr: SuperResolution, coarse: Views, fine: Views, cfg: GaussianHeadConfig,
                 raster: GaussianRasterizer, perceptual: Perceptual, device: torch.device,
                 extra_eval: list[tuple[str, Views, Views]] | None = None):
        """``extra_eval``: (name, coarse, fine) views of held-out sequences, scored on all their cameras."""
        super().__init__(cfg.seed)
        self.head, self.sr = head.to(device), sr.to(device)
        self.coarse_views, self.fine_views = coarse, fine
        self.coarse, self.fine = DeviceViews(coarse, device), DeviceViews(fine, device)
        self.cfg, self.raster, self.perceptual = cfg, raster, perceptual
        self.device = device
        self.amp = getattr(cfg, "precision", "fp32") == "bf16"
        self.head.amp = self.amp
        self.compile = getattr(cfg, "compile", False) and device.type == "cuda"
        self.head.compile = self.compile
        # Super-resolution and losses of a view: static shapes, so one compiled graph (forward and backward).
        self._view_losses = (torch.compile(self.view_losses, options=COMPILE_OPTIONS) if self.compile
                             else self.view_losses)
        self.channels_last = device.type == "cuda"  # cuDNN's fast bf16 convolutions are NHWC
        if self.channels_last:
            torch.backends.cudnn.benchmark = True  # every step has the same shapes: let cuDNN time its algorithms
        if self.channels_last and not self.compile:  # compiled, Inductor lays the weights out (channels-last
            self.sr.to(memory_format=torch.channels_last)  # parameters break its convolution backward)
        net = [p for n, p in head.named_parameters() if n != "delta_pose"] + list(sr.parameters())
        groups = [{"params": net, "lr": cfg.lr_net}]
        if cfg.lr_pose > 0:
            groups.append({"params": [head.delta_pose], "lr": cfg.lr_pose})
        else:
            head.delta_pose.requires_grad_(False)
        self.opt = make_optimizer(groups, device)
        held = set(coarse.camera_index(cfg.holdout_cameras))
        self.train_cams = [c for c in range(len(coarse.cameras)) if c not in held]
        self.held_cams = sorted(held)
        if not self.train_cams:
            raise PipelineError("gaussianhead.holdout_cameras leaves no camera to train on")
        self.eval_sets: list[EvalSet] = []
        if self.held_cams:
            self.eval_sets.append(EvalSet(
                "novel_view", self.coarse, self.fine,
                [(f, c) for f in range(len(coarse.folders)) for c in self.held_cams], True,
                "training frames seen from the held-out cameras"))
        for name, c_views, f_views in extra_eval or []:
            cv, fv = DeviceViews(c_views, device), DeviceViews(f_views, device)
            pairs = [(f, c) for f in range(len(c_views.folders)) for c in range(len(c_views.cameras))]
            self.eval_sets.append(EvalSet(name, cv, fv, pairs, False,
                                          "a held-out sequence (its fitted expressions and poses), all cameras"))
        if self.eval_sets:  # novel view when there are held-out cameras, else self-reenactment
            self.plateau = PlateauRule.of(cfg, f"{self.eval_sets[0].name}_psnr")
        self.step_views: torch.nn.Module = StepViews(self)
        if rank_and_world()[1] > 1:
            self.step_views = torch.nn.parallel.DistributedDataParallel(
                self.step_views, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    def compiling(self) -> bool:
        return self.compile

    def stop_compiling(self) -> None:
        # The super-resolution weights keep their layout: Adam's state (fused on CUDA) must match it.
        self.compile = self.head.compile = False
        self._view_losses = self.view_losses

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"head": self.head, "sr": self.sr}

    def rasterize(self, frame: int, cam: int, views: DeviceViews | None = None, known_frame: bool = True,
                  extrinsic: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse features (h, w, C), fp32; ``extrinsic`` (3, 4) replaces the camera's pose (intrinsics kept)."""
        v = views or self.coarse
        splats = self.head.splats(v.exp[frame], v.pose[frame], v.scale, frame if known_frame else None)
        view = torch.eye(4, device=self.device)
        view[:3] = v.E[frame, cam] if extrinsic is None else extrinsic
        with torch.autocast(self.device.type, enabled=False):  # the rasteriser takes fp32
            img, _ = self.raster(Splats(*(t.float() for t in (splats.means, splats.quats, splats.scales,
                                                               splats.opacities, splats.colors))),
                                 view, v.K[frame, cam], v.size, v.size, with_alpha=False)
        return img

    def super_resolve(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse features (h, w, C) -> the same as (C, h, w) and the super-resolved RGB (3, H, W), fp32."""
        feats = img.permute(2, 0, 1)[None]
        if self.channels_last:
            feats = feats.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            sr = self.sr(feats)
        return feats[0], sr[0].float()

    def render(self, frame: int, cam: int, views: DeviceViews | None = None, known_frame: bool = True,
               extrinsic: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse features (C, h, w) and the super-resolved RGB (3, H, W), fp32 (arguments: :meth:`rasterize`)."""
        return self.super_resolve(self.rasterize(frame, cam, views, known_frame, extrinsic))

    def targets(self, frame: int, cam: int, coarse: DeviceViews | None = None,
                fine: DeviceViews | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in (("coarse", coarse or self.coarse), ("fine", fine or self.fine)):
            image, mask, visible = v.view(frame, cam)
            out[name], out[f"{name}_visible"] = matted(image, mask, visible)
            out[f"{name}_mask"] = mask
        return out

    def view_losses(self, img: torch.Tensor, coarse: tuple[torch.Tensor, ...],
                    fine: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Total, coarse L1, fine L1 and perceptual loss of one view from its coarse render (h, w, C) and the
        uint8 (image, matte, visibility) targets at both sizes (:meth:`DeviceViews.raw`)."""
        return self.image_losses(*self.super_resolve(img), coarse, fine)

    def image_losses(self, feats: torch.Tensor, sr: torch.Tensor, coarse: tuple[torch.Tensor, ...],
                     fine: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """:meth:`view_losses` from the coarse features (C, h, w) and the super-resolved RGB (3, H, W)."""
        (tc, vc), (tf, vf) = (matted(*(t.float() * (1 / 255) for t in raw)) for raw in (coarse, fine))
        low = F.l1_loss(feats[:3].float() * vc, tc * vc)
        high = F.l1_loss(sr * vf, tf * vf)
        perc = self.perceptual.loss((sr * vf)[None], (tf * vf)[None])
        cfg = self.cfg
        return cfg.w_rgb_low * low + cfg.w_rgb_high * high + cfg.w_perceptual * perc, low, high, perc

    def losses(self, frame: int, cam: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = self.rasterize(frame, cam)
        total, low, high, perc = self._view_losses(img, self.coarse.raw(frame, cam), self.fine.raw(frame, cam))
        return total, {"loss": total.detach(), "rgb_low": low.detach(), "rgb_high": high.detach(),
                       "perceptual": perc.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every evaluation set under the named protocol (``metrics.PROTOCOL``): ``<set>_<score>[_matte]``;
        ``holdout_psnr`` / ``holdout_ssim`` (/ ``holdout_lpips``) repeat the novel-view full-image scores."""
        out: dict[str, float] = {}
        lpips = self.perceptual.lpips
        for s in self.eval_sets:
            rows = []
            for f, c in shard(s.pairs):  # each rank scores its share; every rank averages them all, in order
                _, sr = self.render(f, c, s.coarse, s.known_frames)
                t = self.targets(f, c, s.coarse, s.fine)
                vis = t["fine_visible"]
                rows.append(image_scores(sr.clamp(0, 1) * vis, t["fine"] * vis, t["fine_mask"] * vis[0], lpips))
            rows = gather(rows)
            out.update(average(rows, s.name))
        for k in ("psnr", "ssim", "lpips"):
            if f"novel_view_{k}" in out:
                out[f"holdout_{k}"] = out[f"novel_view_{k}"]
        return out

    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's ``views_per_step`` views, drawn alike on every rank; this rank computes the mean loss
        of every world-th of them, and DDP averages the ranks' gradients: the gradient of the mean of all."""
        n = self.cfg.views_per_step
        frames = torch.randint(len(self.coarse_views.folders), (n,), generator=self.gen)
        cams = torch.randint(len(self.train_cams), (n,), generator=self.gen)
        pairs = [(f, self.train_cams[c]) for f, c in zip(frames.tolist(), cams.tolist(), strict=True)]
        return self.step_views(shard(pairs))

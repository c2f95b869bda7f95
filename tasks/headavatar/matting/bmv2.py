"""BackgroundMattingV2 (Lin et al., CVPR 2021), MattingRefine with a ResNet backbone.

Written for this project in plain PyTorch (no torchvision, which has no CPU build on the
development machines), with module names laid out so that the published checkpoints
(``pytorch_resnet101.pth``, ``pytorch_resnet50.pth``) load with strict key matching:
``backbone.*`` (torchvision ResNet names, dilated last stage, no fc), ``aspp.*`` (torchvision
DeepLabV3 ASPP names, rates 3/6/9), ``decoder.*`` and ``refiner.*``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headavatar.devices import resolve_device
from headavatar.errors import ConfigError
from headavatar.matting.base import Matter
from headavatar.settings import MattingConfig

RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet with output stride 16 (last stage dilated); returns the features of every scale."""

    def __init__(self, in_channels: int, variant: str = "resnet101"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes, self.dilation = 64, 1
        blocks = RESNET_LAYERS[variant]
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=2, dilate=True)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, previous_dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = x
        x = self.relu(self.bn1(self.conv1(x)))
        x1 = x
        x = self.layer1(self.maxpool(x))
        x2 = x
        x = self.layer2(x)
        x3 = x
        x4 = self.layer4(self.layer3(x))
        return x4, x3, x2, x1, x0


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=dilation if k == 3 else 0, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, ...] = (3, 6, 9), cout: int = 256):
        super().__init__()
        convs: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(cin, cout, 1))]
        convs += [nn.Sequential(*_conv_bn_relu(cin, cout, 3, r)) for r in rates]
        convs.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(convs)
        self.project = nn.Sequential(*_conv_bn_relu(len(convs) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([c(x) for c in self.convs], dim=1))


class Decoder(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (256, 128, 64, 48, 37),
                 features: tuple[int, ...] = (512, 256, 64, 6)):
        super().__init__()
        self.conv1 = nn.Conv2d(features[0] + channels[0], channels[1], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(features[1] + channels[1], channels[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.conv3 = nn.Conv2d(features[2] + channels[2], channels[3], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels[3])
        self.conv4 = nn.Conv2d(features[3] + channels[3], channels[4], 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x4: torch.Tensor, x3: torch.Tensor, x2: torch.Tensor, x1: torch.Tensor,
                x0: torch.Tensor) -> torch.Tensor:
        for skip, conv, bn in ((x3, self.conv1, self.bn1), (x2, self.conv2, self.bn2), (x1, self.conv3, self.bn3)):
            x4 = F.interpolate(x4, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x4 = self.relu(bn(conv(torch.cat([x4, skip], dim=1))))
        x4 = F.interpolate(x4, size=x0.shape[2:], mode="bilinear", align_corners=False)
        return self.conv4(torch.cat([x4, x0], dim=1))


class Refiner(nn.Module):
    """Refines the 4x4 patches with the largest predicted error at full resolution."""

    def __init__(self, mode: str = "sampling", sample_pixels: int = 80_000, threshold: float = 0.1):
        super().__init__()
        if mode not in ("full", "sampling", "thresholding"):
            raise ConfigError(f"matting.refine_mode must be full, sampling or thresholding, got {mode!r}")
        self.mode, self.sample_pixels, self.threshold = mode, sample_pixels, threshold
        self.conv1 = nn.Conv2d(32 + 6 + 4, 24, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16 + 6, 12, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 4, 3, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def _select(self, err: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            return torch.ones_like(err)
        if self.mode == "thresholding":
            return err.gt(self.threshold).to(err.dtype)
        b, _, h, w = err.shape
        flat = err.view(b, -1)
        k = min(self.sample_pixels // 16, flat.shape[1])
        ref = torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1, sorted=False).indices, 1.0)
        return (ref * flat.gt(0).to(flat.dtype)).view(b, 1, h, w)  # never refine where no error

    @staticmethod
    def _patches(x: torch.Tensor, idx: tuple[torch.Tensor, ...], size: int, pad: int) -> torch.Tensor:
        x = F.pad(x, (pad,) * 4)
        return x.permute(0, 2, 3, 1).unfold(1, size + 2 * pad, size).unfold(2, size + 2 * pad, size)[idx]

    def forward(self, src: torch.Tensor, bgr: torch.Tensor, pha: torch.Tensor, fgr: torch.Tensor,
                err: torch.Tensor, hid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = src.shape[2:]
        src_bgr = torch.cat([src, bgr], dim=1)
        up = F.interpolate(torch.cat([pha, fgr], dim=1), (h, w), mode="bilinear", align_corners=False)
        err = F.interpolate(err, (h // 4, w // 4), mode="bilinear", align_corners=False)
        ref = self._select(err)
        idx = tuple(torch.nonzero(ref.squeeze(1)).unbind(1))
        if idx[0].numel() == 0:
            return up[:, :1], up[:, 1:]
        x = F.interpolate(torch.cat([hid, pha, fgr], dim=1), (h // 2, w // 2), mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, (h // 2, w // 2), mode="bilinear", align_corners=False)
        x = torch.cat([self._patches(x, idx, 2, 3), self._patches(y, idx, 2, 3)], dim=1)
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        x = F.interpolate(x, 8, mode="nearest")
        x = torch.cat([x, self._patches(src_bgr, idx, 4, 2)], dim=1)
        x = self.conv4(self.relu(self.bn3(self.conv3(x))))
        b, c = up.shape[:2]
        grid = up.view(b, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5).clone()
        grid[idx] = x.to(grid.dtype)
        out = grid.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out[:, :1], out[:, 1:]


class MattingRefine(nn.Module):
    """Coarse matting at ``backbone_scale`` plus patch refinement at full resolution."""

    def __init__(self, backbone: str = "resnet101", backbone_scale: float = 0.25, refine_mode: str = "sampling",
                 refine_sample_pixels: int = 80_000, refine_threshold: float = 0.1):
        super().__init__()
        if backbone not in RESNET_LAYERS:
            raise ConfigError(f"matting.backbone must be one of {sorted(RESNET_LAYERS)}, got {backbone!r}")
        if not 0 < backbone_scale <= 0.5:
            raise ConfigError(f"matting.backbone_scale must be in (0, 0.5], got {backbone_scale}")
        self.backbone_scale = backbone_scale
        self.backbone = ResNetEncoder(6, backbone)
        self.aspp = ASPP(2048)
        self.decoder = Decoder()
        self.refiner = Refiner(refine_mode, refine_sample_pixels, refine_threshold)

    def forward(self, src: torch.Tensor, bgr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``src``, ``bgr``: (B, 3, H, W) RGB in [0, 1], H and W divisible by 4 -> alpha, foreground."""
        h, w = src.shape[2:]
        if h % 4 or w % 4:
            raise ValueError(f"image size {h}x{w} must be divisible by 4")
        size = (int(h * self.backbone_scale), int(w * self.backbone_scale))
        src_sm = F.interpolate(src, size, mode="bilinear", align_corners=False)
        bgr_sm = F.interpolate(bgr, size, mode="bilinear", align_corners=False)
        x = self.decoder(*self.aspp_features(torch.cat([src_sm, bgr_sm], dim=1)))
        pha_sm, fgr_sm = x[:, 0:1].clamp(0.0, 1.0), x[:, 1:4]
        err_sm, hid_sm = x[:, 4:5].clamp(0.0, 1.0), x[:, 5:].relu()
        pha, fgr = self.refiner(src, bgr, pha_sm, fgr_sm, err_sm, hid_sm)
        return pha.clamp(0.0, 1.0), (fgr + src).clamp(0.0, 1.0)

    def aspp_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x4, *shortcuts = self.backbone(x)
        return (self.aspp(x4), *shortcuts)


def load_weights(model: MattingRefine, path: Path) -> MattingRefine:
    """Strict load of a published (or project-saved) checkpoint; one-line errors otherwise."""
    if not Path(path).is_file():
        raise ConfigError(f"matting weights not found: {path} (set matting.weights to the BackgroundMattingV2 "
                          "checkpoint, e.g. pytorch_resnet101.pth, or use matting.method=classical)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"matting weights {path} are not a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ConfigError(f"matting weights {path} do not match MattingRefine: {first[:200]}") from None
    return model


class BMV2Matter(Matter):
    """MattingRefine with the configured weights on the best device; fp16 on CUDA when configured."""

    def __init__(self, cfg: MattingConfig, weights: Path):
        self.device = resolve_device(cfg.device)
        model = MattingRefine(cfg.backbone, cfg.backbone_scale, cfg.refine_mode, cfg.refine_sample_pixels,
                              cfg.refine_threshold)
        load_weights(model, weights)
        self.dtype = torch.float16 if cfg.precision == "fp16" and self.device.type == "cuda" else torch.float32
        self.model = model.eval().to(self.device, self.dtype)
        self.batch_size = cfg.batch_size

    def _tensor(self, batch: list[np.ndarray]) -> torch.Tensor:
        t = torch.from_numpy(np.stack(batch)[..., ::-1].copy()).to(self.device, non_blocking=True)
        return t.permute(0, 3, 1, 2).to(self.dtype).div_(255)

    def __call__(self, images: list[np.ndarray], plates: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            pha, _ = self.model(self._tensor(images), self._tensor(plates))
        return list(pha[:, 0].float().cpu().numpy())

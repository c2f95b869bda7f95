"""Image metrics and the perceptual loss: PSNR, SSIM, and LPIPS-VGG when its weights are supplied.

LPIPS needs ImageNet VGG-16 weights plus LPIPS's linear heads, which are downloads this pipeline
never makes at run time. ``gaussianhead.lpips_weights`` names ONE state dict holding torchvision's
``vgg16`` ``features.*`` tensors and LPIPS v0.1's ``lin{0..4}.model.1.weight`` (docs/stages/gaussianhead.md shows how
to merge them). Without it the perceptual term is 1 - SSIM, with a warning, and LPIPS is not
reported.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from headavatar.errors import ConfigError

log = logging.getLogger(__name__)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's numbering


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (B, 3, H, W) in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


# How SSIM blurs its local moments: "conv" = two cuDNN 1-D convolutions (fast eagerly), "shifts" = the sum of
# the window's shifted copies (fused kernels under torch.compile; with cuDNN's one-channel fp32 convolutions
# the compiled stage-6 step took 19.5 instead of 16.96 ms on an H200, stage6_throughput_gpu.json), "auto" =
# shifts while torch.compile traces, else conv. Both are the same zero-padded separable Gaussian blur.
BLUR = "auto"


def _gaussian_window(window: int, sigma: float) -> list[float]:
    g = [math.exp(-((i - window // 2) ** 2) / (2 * sigma**2)) for i in range(window)]
    return [v / sum(g) for v in g]


def _blur_shifts(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Separable zero-padded blur of (B, C, H, W) as weighted sums of shifted slices (rows, then columns)."""
    r = len(weights) // 2
    h, w = x.shape[-2:]
    p = F.pad(x, (r, r))
    x = sum(wt * p[..., i : i + w] for i, wt in enumerate(weights))
    p = F.pad(x, (0, 0, r, r))
    return sum(wt * p[..., i : i + h, :] for i, wt in enumerate(weights))


def _blur_conv(x: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """The same blur as two one-channel convolutions, channels as batch (cuDNN; a depthwise convolution
    would run a slow generic kernel)."""
    t = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    bsz, n, h, w = x.shape
    flat = x.reshape(bsz * n, 1, h, w)
    flat = F.conv2d(flat, g.view(1, 1, 1, window), padding=(0, window // 2))
    flat = F.conv2d(flat, g.view(1, 1, window, 1), padding=(window // 2, 0))
    return flat.reshape(bsz, n, h, w)


# How SSIM's gradient is formed: "autograd" = autograd through the blur of all five moments; "explicit" =
# :class:`_SSIM`'s own backward (three blurred gradient maps per channel, of the image that needs one). Compiled,
# "explicit" cut the elementwise GPU time of a stage-6 step by 1.1 ms but made the step slower (16.64 -> 20.91 ms,
# one H100, benchmarks/results/stage6_throughput_gpu_run2.json): so not the default.
GRAD = "autograd"
C1, C2 = 0.01**2, 0.03**2


def _blur(x: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """The zero-padded separable Gaussian blur the way ``BLUR`` says."""
    if BLUR == "shifts" or (BLUR == "auto" and torch.compiler.is_compiling()):
        return _blur_shifts(x, _gaussian_window(window, sigma))
    return _blur_conv(x, window, sigma)


def _ssim_terms(moments: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
    """SSIM map and its factors from the blurred moments (mu_a, mu_b, E[aa], E[bb], E[ab]) stacked on dim 1."""
    mu_a, mu_b, aa, bb, ab = moments.split(c, 1)
    a1, a2 = 2 * mu_a * mu_b + C1, 2 * (ab - mu_a * mu_b) + C2
    b1, b2 = mu_a**2 + mu_b**2 + C1, aa - mu_a**2 + bb - mu_b**2 + C2
    return a1 * a2 / (b1 * b2), mu_a, mu_b, a1, a2, b1, b2


class _SSIM(torch.autograd.Function):
    """Per-image mean SSIM with its gradient written out: with S = A1 A2 / (B1 B2) of the blurred moments,
    dS/dmu_a = S (2 mu_b / A1 - 2 mu_b / A2 - 2 mu_a / B1 + 2 mu_a / B2), dS/dE[aa] = -S / B2 and
    dS/dE[ab] = 2 S / A2; the blur is its own adjoint (symmetric window, zero padding), so the image's
    gradient is blur(dmu_a) + 2 a blur(dE[aa]) + b blur(dE[ab]). Autograd through the blur moves all five
    moment gradients through it and its padding (slice) backward, whether an input needs them or not."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
        moments = _blur(torch.cat([a, b, a * a, b * b, a * b], 1), window, sigma)
        ctx.save_for_backward(a, b, moments)
        ctx.window, ctx.sigma = window, sigma
        return _ssim_terms(moments, a.shape[1])[0].flatten(1).mean(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b, moments = ctx.saved_tensors
        s, mu_a, mu_b, a1, a2, b1, b2 = _ssim_terms(moments, a.shape[1])
        gs = s * (grad / a[0].numel()).view(-1, 1, 1, 1)
        grads = []
        for x, y, mu_x, mu_y, need in ((a, b, mu_a, mu_b, ctx.needs_input_grad[0]),
                                       (b, a, mu_b, mu_a, ctx.needs_input_grad[1])):
            if not need:
                grads.append(None)
                continue
            d_mu = 2 * gs * (mu_y / a1 - mu_y / a2 - mu_x / b1 + mu_x / b2)
            d_xx, d_xy = -gs / b2, 2 * gs / a2
            g_mu, g_xx, g_xy = _blur(torch.cat([d_mu, d_xx, d_xy], 1), ctx.window, ctx.sigma).split(x.shape[1], 1)
            grads.append(g_mu + 2 * x * g_xx + y * g_xy)
        return grads[0], grads[1], None, None


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image mean SSIM (Wang et al. 2004, Gaussian window, zero padding), (B, C, H, W) in [0, 1].

    The five local moments are blurred together with the window's two 1-D factors (22 taps a pixel
    instead of 121; how: ``BLUR``), in fp32 even under autocast: the variances are differences of nearly
    equal numbers. The gradient: ``GRAD``."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        if GRAD == "explicit":
            return _SSIM.apply(a, b, window, sigma)
        c = a.shape[1]
        blurred = _blur(torch.cat([a, b, a * a, b * b, a * b], 1), window, sigma)
        return _ssim_terms(blurred, c)[0].flatten(1).mean(1)


class LPIPSVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                ch = int(v)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per image distance, inputs (B, 3, H, W) in [0, 1]."""
        xa, xb = (((t * 2 - 1) - self.shift) / self.scale for t in (a, b))
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        tap = 0
        for i, layer in enumerate(self.features):
            xa, xb = layer(xa), layer(xb)
            if i == TAPS[tap]:
                na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((na - nb) ** 2).mean((1, 2, 3))
                tap += 1
                if tap == len(TAPS):
                    break
        return total

    def load(self, path: Path, name: str) -> LPIPSVGG:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"gaussianhead.lpips_weights {name} is not a PyTorch state dict "
                              f"({type(e).__name__})") from None
        mapped = {k: v for k, v in state.items() if k.startswith("features.")}
        mapped.update({f"lins.{i}.weight": state.get(f"lin{i}.model.1.weight") for i in range(5)})
        missing = [f"lin{i}.model.1.weight" for i in range(5) if mapped[f"lins.{i}.weight"] is None]
        try:
            if missing:
                raise RuntimeError(f"missing {', '.join(missing)}")
            self.load_state_dict({**mapped, "shift": self.shift, "scale": self.scale}, strict=True)
        except RuntimeError as e:
            first = str(e).replace("\n", " ")
            raise ConfigError(f"gaussianhead.lpips_weights {name} do not match LPIPS-VGG: {first[:200]}") from None
        return self


class Perceptual:
    """The training term and, when LPIPS is available, the reported metric."""

    def __init__(self, lpips: LPIPSVGG | None):
        self.lpips = lpips
        if lpips is None:
            log.warning("gaussianhead.lpips_weights not set: the perceptual loss is 1 - SSIM and LPIPS is not "
                        "reported (see docs/stages/gaussianhead.md)")

    def loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b).mean() if self.lpips is not None else 1 - ssim(a, b).mean()

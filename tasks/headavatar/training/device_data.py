"""Training views where the step can read them without waiting: decoded once, kept on the GPU.

A step that builds its batch from numpy copies pageable host memory to the device, and every such
copy first waits for the stream to drain: the GPU idles while the host prepares the next step
(a third of an H200 stage-6 step). Here images, mattes and visibility stay uint8 (converted to
float by the indexing kernel), on the training device when they fit in ``gpu_fraction`` of its
free memory; otherwise they stay in pinned host memory and each batch is one asynchronous copy of
just the chosen views. Small per-frame arrays (cameras, fit, expression) always live on the device.
A full NeRSemble capture at 2048² (16 cameras x ~100 frames, image + matte + visibility: ~21 MB a
view, ~34 GB) fits an H200 (~139 GiB).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from headavatar.training.views import Views

log = logging.getLogger(__name__)


def _pixels_bytes(views: Views) -> int:
    return views.images.nbytes + views.masks.nbytes + views.visible.nbytes


class DeviceViews:
    """The arrays of a :class:`Views` as tensors, indexed by (frame, camera) tensors on the device."""

    def __init__(self, views: Views, device: torch.device, gpu_fraction: float = 0.5):
        self.views, self.device = views, device
        need = _pixels_bytes(views)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            self.resident = need <= gpu_fraction * free
            if not self.resident:
                log.warning("training images need %.1f GiB, more than %.0f%% of the %.1f GiB free on %s: they stay "
                            "in pinned host memory and each step copies its views", need / 2**30,
                            100 * gpu_fraction, free / 2**30, device)
        else:
            self.resident = True  # host memory is the device
        where = device if self.resident else torch.device("cpu")

        def pixels(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if not self.resident:
                return t.pin_memory()
            return t.to(where)

        self.images, self.masks, self.visible = pixels(views.images), pixels(views.masks), pixels(views.visible)

        def small(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32).to(device)

        self.K, self.E = small(views.intrinsics), small(views.extrinsics)
        self.pose, self.exp, self.landmarks_3d = small(views.pose), small(views.exp), small(views.landmarks_3d)
        self.scale = torch.tensor(views.scale, dtype=torch.float32, device=device)

    @property
    def size(self) -> int:
        return self.views.size

    @property
    def folders(self) -> list[str]:
        return self.views.folders

    @property
    def cameras(self) -> list[str]:
        return self.views.cameras

    def raw(self, frame: int, cam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image (S, S, 3), matte and visibility (S, S) of one view as stored (uint8), on the device, without
        host synchronisation (a compiled loss converts them in its own fused kernels)."""
        if self.resident:
            return self.images[frame, cam], self.masks[frame, cam], self.visible[frame, cam]
        return tuple(t[frame, cam].pin_memory().to(self.device, non_blocking=True)
                     for t in (self.images, self.masks, self.visible))

    def view(self, frame: int, cam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`raw` as float in [0, 1]."""
        return tuple(t.float().mul_(1 / 255) for t in self.raw(frame, cam))

    @property
    def nbytes_pixels(self) -> int:
        return _pixels_bytes(self.views)

    def _pixels(self, t: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return t[f, c].float().mul_(1 / 255)
        picked = t[f.cpu(), c.cpu()].pin_memory()
        return picked.to(self.device, non_blocking=True).float().mul_(1 / 255)

    def _index(self, i: torch.Tensor) -> torch.Tensor:
        """A host index tensor on the device without a blocking copy (pageable copies wait for the stream)."""
        if self.device.type != "cuda" or i.device.type == "cuda":
            return i.to(self.device)
        return i.pin_memory().to(self.device, non_blocking=True)

    def batch(self, frames: torch.Tensor, cams: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same dict as :meth:`Views.tensors` (float32, pixels in [0, 1]) plus ``scale``, for CPU index tensors."""
        f, c = self._index(frames), self._index(cams)
        pf, pc = (f, c) if self.resident else (frames.cpu(), cams.cpu())
        return {"image": self._pixels(self.images, pf, pc), "mask": self._pixels(self.masks, pf, pc),
                "visible": self._pixels(self.visible, pf, pc), "K": self.K[f, c], "E": self.E[f, c],
                "pose": self.pose[f], "exp": self.exp[f], "landmarks_3d": self.landmarks_3d[f], "scale": self.scale}

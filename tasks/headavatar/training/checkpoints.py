"""Training checkpoints kept in the stage's private state area of the bucket.

A checkpoint records the attempt's cache key (inputs + config): a retry of the same task resumes
from it, while changed inputs or config, or ``--force``, start over. Uploads go through a scratch
file and one PUT (multipart when large), so a killed upload never replaces a good checkpoint.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from headavatar.contract.stage import StageContext
from headavatar.errors import MissingObject

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, ctx: StageContext, name: str = "checkpoint.pt"):
        self.ctx = ctx
        self.key = ctx.state_key(name)

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint of an attempt with the same cache key, else None."""
        if self.ctx.fresh:
            self.clear()
            return None
        try:
            data = self.ctx.store.get_bytes(self.key)
        except MissingObject:
            return None
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        if state.get("cache_key") != self.ctx.cache_key:
            log.info("%s/%s: checkpoint from other inputs/config ignored", self.ctx.capture, self.ctx.stage)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        path = self.ctx.scratch / "checkpoint.pt"
        torch.save({**state, "cache_key": self.ctx.cache_key}, path)
        self.ctx.store.upload_file(path, self.key)
        path.unlink()

    def clear(self) -> None:
        self.ctx.store.delete(self.key)

"""Training checkpoints kept in the stage's private state area of the bucket.

A checkpoint records the attempt's cache key (inputs + config): a retry of the same task resumes
from it, while changed inputs or config, or ``--force``, start over. Uploads go through a scratch
file and one PUT (multipart when large), so a killed upload never replaces a good checkpoint.

Every ``keep_every`` steps a copy is also published as a stage output, ``checkpoints/step-<N>.pt``
(listed in the manifest, referenced by S3 URI in MLflow). The resumable checkpoint carries the list
of published copies, so an attempt that resumes still lists the copies its predecessors made.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from headavatar.contract.manifest import FileEntry
from headavatar.contract.stage import StageContext
from headavatar.errors import MissingObject
from headavatar.storage import sha256_file

log = logging.getLogger(__name__)
PUBLISHED = "checkpoints"


class Checkpoints:
    def __init__(self, ctx: StageContext, keep_every: int = 0, name: str = "checkpoint.pt"):
        self.ctx, self.keep_every = ctx, keep_every
        self.key = ctx.state_key(name)
        self.published: list[dict[str, Any]] = []  # {"step", "file", "size", "sha256"}

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
        for p in state.get("published", []):
            if self.ctx.store.exists(self.ctx.outputs.key(p["file"])):
                self.ctx.outputs.record(p["file"], FileEntry(p["size"], p["sha256"]))
                self.published.append(p)
            else:
                log.warning("%s/%s: published checkpoint %s vanished; not listed", self.ctx.capture,
                            self.ctx.stage, p["file"])
        return state

    def due(self, step: int) -> bool:
        return bool(self.keep_every) and step % self.keep_every == 0

    def save(self, state: dict[str, Any]) -> None:
        path = self.ctx.scratch / "checkpoint.pt"
        payload = {**state, "cache_key": self.ctx.cache_key}
        if self.due(state["step"]):
            torch.save(payload, path)
            rel = f"{PUBLISHED}/step-{state['step']:08d}.pt"
            entry = FileEntry(path.stat().st_size, sha256_file(path))
            self.ctx.store.upload_file(path, self.ctx.outputs.key(rel))
            self.ctx.outputs.record(rel, entry)
            self.published.append({"step": state["step"], "file": rel, "size": entry.size, "sha256": entry.sha256})
        torch.save({**payload, "published": self.published}, path)
        self.ctx.store.upload_file(path, self.key)
        path.unlink()

    def clear(self) -> None:
        self.ctx.store.delete(self.key)

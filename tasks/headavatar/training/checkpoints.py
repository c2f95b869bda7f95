"""Training checkpoints kept in the stage's private state area of the bucket.

A checkpoint records the attempt's cache key (inputs + result settings): a retry of the same task
resumes from it, also with other execution settings (device, compile, precision: weights and
optimiser state are fp32 whatever the precision, and load onto the CPU first), while changed inputs
or result settings, or ``--force``, start over. A run forced for an orchestrator run (``--force-run``)
starts over once: the checkpoint records that run, and its retries resume from it. An unfinished
training under other settings is set aside, not overwritten (``_state/unfinished/``, as many as
``storage.keep_variants``), and resumes when those settings come back. Uploads go through a scratch
file and one PUT (multipart when large), so a killed upload never replaces a good checkpoint.

Every ``keep_every`` steps a copy is also published as a stage output, ``checkpoints/step-<N>.pt``
(listed in the manifest, referenced by S3 URI in MLflow). The resumable checkpoint carries the list
of published copies, so an attempt that resumes still lists the copies its predecessors made.

No code from data: checkpoints and models are read back with ``weights_only=True`` (:func:`load_plain`),
so they hold tensors and plain containers only (:func:`plain` checks that on save); a file that is
anything else, such as a pickle that would run code, is refused with a one-line
:class:`~headavatar.errors.RefusedObject` naming its key, and nothing in it runs.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headavatar.contract import variants
from headavatar.contract.manifest import FileEntry
from headavatar.contract.stage import StageContext
from headavatar.errors import ConfigError, MissingObject, RefusedObject
from headavatar.storage import ObjectStore, sha256_file

log = logging.getLogger(__name__)
PUBLISHED = "checkpoints"
RESUMABLE = "checkpoint.pt"  # the stage state key (contract.outputs.state_key) a resumed attempt loads
UNFINISHED = "unfinished"  # state folder of unfinished trainings under other settings, <cache key[:16]>.pt
# torch < 2.6's weights-only unpickler could be made to run code (CVE-2025-32434).
_SAFE_TORCH = (2, 6)
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_TORCH_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _torch_version() -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in torch.__version__.split("+")[0].split(".")[:2])


def _refusal_reason(e: BaseException) -> str:
    """Why torch refused the bytes, in a few words (never its advice: ``weights_only=False`` is the hole)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if m := re.search(r"GLOBAL ([\w.]+)", text):
        return f"a pickle that calls {m.group(1)}"
    if m := re.search(r"Unsupported operand (\d+)", text):
        return f"a pickle with opcode {m.group(1)}, which plain data never needs"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first if len(first) <= 160 else first[:157] + "..."
    name = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    return f"{name}: {first}" if first else name


def load_plain(data: bytes, source: str, remedy: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """A dict saved with ``torch.save``, read with ``weights_only=True``: tensors and plain containers only.

    ``source`` names where the bytes came from (an ``s3://`` URI); anything else (a pickle carrying
    objects or code, a corrupt or truncated file, not a dict, a ``required`` key missing) raises
    :class:`RefusedObject`, one line naming ``source``, with ``remedy`` (what to do about it) appended."""
    if _torch_version() < _SAFE_TORCH:
        raise ConfigError(f"torch {torch.__version__} cannot load {source} safely: its weights-only loader can be "
                          f"made to run code (CVE-2025-32434); install torch>={'.'.join(map(str, _SAFE_TORCH))}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # bytes from the bucket: whatever the parser trips over, the file is refused
        raise RefusedObject(f"{source}: refused to load: not plain tensors and containers "
                            f"({_refusal_reason(e)}); {remedy}") from None
    if not isinstance(state, dict):
        raise RefusedObject(f"{source}: refused to load: a {type(state).__name__}, not a dict; {remedy}")
    missing = [k for k in required if k not in state]
    if missing:
        raise RefusedObject(f"{source}: refused to load: no {', '.join(map(repr, missing))}; {remedy}")
    return state


def load_stored(store: ObjectStore, key: str, remedy: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """:func:`load_plain` of the object at ``key`` (a missing object raises MissingObject as usual)."""
    return load_plain(store.get_bytes(key), store.uri(key), remedy, required)


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as :func:`load_plain` can read it back: numpy scalars become Python numbers; any other
    object (numpy array, dataclass, ...) is a TypeError here rather than an unloadable file later.
    Containers that need no change are returned as they are (a state dict keeps its ``_metadata``)."""
    if isinstance(obj, _TORCH_LEAVES) or type(obj) in _PLAIN_SCALARS:
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return obj.item()
    if type(obj) in (dict, OrderedDict):
        items = {}
        for k, v in obj.items():
            if type(k) not in _PLAIN_SCALARS:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be loaded with weights_only")
            items[k] = plain(v, f"{where}[{k!r}]")
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, set):
        seq = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(a is b for a, b in zip(seq, obj, strict=True)) else type(obj)(seq)
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with weights_only; "
                    "save it as tensors, plain containers or JSON")


def save_file(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through memory: written straight to a full disk, torch raises a RuntimeError about a
    stream position; written as bytes, the disk's own OSError (ENOSPC) reaches the stage contract, which
    names the scratch directory and how to free it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


class Checkpoints:
    def __init__(self, ctx: StageContext, keep_every: int = 0, ceiling: int | None = None):
        """``ceiling``: the training's step ceiling, when it has one (a checkpoint of the same training under
        another ceiling continues under this one, if it is not past it)."""
        self.ctx, self.keep_every, self.ceiling = ctx, keep_every, ceiling
        self.key = ctx.state_key(RESUMABLE)
        self.published: list[dict[str, Any]] = []  # {"step", "file", "size", "sha256"}

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint of an attempt with the same cache key, else None.

        The live checkpoint of an unfinished training under other inputs or settings is set aside first
        (``set_aside``): the next save would overwrite it, and going back to those settings resumes it."""
        try:
            state = self._read(self.key)
        except RefusedObject:
            if not self.ctx.fresh:
                raise
            state = None  # --force: its remedy
        if state is not None and state["cache_key"] not in self.ctx.resumable_keys:
            if self._continues(state):
                log.info("%s/%s: continuing the training of step %s, made under another step ceiling, up to %s",
                         self.ctx.capture, self.ctx.stage, state["step"], self.ceiling)
            else:
                log.info("%s/%s: checkpoint from other inputs/config ignored", self.ctx.capture, self.ctx.stage)
                self.set_aside(state)
                state = None
        if self.ctx.fresh:
            self.clear()
            self.ctx.store.delete(self.aside_key(self.ctx.cache_key))
            return None
        if state is None and (state := self._read(self.aside_key(self.ctx.cache_key))) is not None:
            if state["cache_key"] not in self.ctx.resumable_keys:  # a 16-character name, checked in full
                return None
            self.ctx.store.copy(self.aside_key(self.ctx.cache_key), self.key)
            self.ctx.store.delete(self.aside_key(self.ctx.cache_key))
            log.info("%s/%s: resuming the unfinished training of these settings kept from earlier (step %s)",
                     self.ctx.capture, self.ctx.stage, state["step"])
        if state is None:
            return None
        if self.ctx.force_run and state.get("forced_by", "") != self.ctx.force_run:
            log.info("%s/%s: checkpoint at step %s made before run %s forced a recompute; starting over",
                     self.ctx.capture, self.ctx.stage, state["step"], self.ctx.force_run)
            self.clear()
            return None
        for p in state.get("published", []):
            if self.ctx.store.exists(self.ctx.outputs.key(p["file"])):
                self.ctx.outputs.record(p["file"], FileEntry(p["size"], p["sha256"]))
                self.published.append(p)
            else:
                log.warning("%s/%s: published checkpoint %s vanished; not listed", self.ctx.capture,
                            self.ctx.stage, p["file"])
        return state

    def _continues(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` is a step of this training under another ceiling, not past this one: the ceiling
        only ends the loop (no schedule depends on it), so it is a step of this attempt's trajectory too."""
        return (self.ceiling is not None and bool(self.ctx.continuation)
                and state.get("continuation") == self.ctx.continuation and int(state["step"]) <= self.ceiling)

    def _read(self, key: str) -> dict[str, Any] | None:
        try:
            data = self.ctx.store.get_bytes(key)
        except MissingObject:
            return None
        return load_plain(data, self.ctx.store.uri(key),
                          f"not a checkpoint this pipeline wrote: delete it, or start over with 'headavatar run "
                          f"{self.ctx.stage} --capture {self.ctx.capture} --force'", required=("step", "cache_key"))

    def aside_key(self, cache_key: str) -> str:
        return self.ctx.state_key(f"{UNFINISHED}/{cache_key[:variants.KEY_CHARS]}.pt")

    def set_aside(self, state: dict[str, Any]) -> None:
        """Keep the live checkpoint of another cache key, unless its training finished (its result is a kept
        variant) or no variants are kept; the newest ``storage.keep_variants`` are kept."""
        keep, prefix = self.ctx.config.storage.keep_variants, self.ctx.outputs.prefix
        if keep == 0 or variants.find(self.ctx.store, prefix, state["cache_key"]) is not None:
            return
        self.ctx.store.copy(self.key, self.aside_key(state["cache_key"]))
        log.info("%s/%s: kept the unfinished training of other settings (step %s) at %s; going back to them "
                 "resumes it", self.ctx.capture, self.ctx.stage, state["step"],
                 self.ctx.store.uri(self.aside_key(state["cache_key"])))
        aside = sorted(self.ctx.store.list(self.ctx.state_key(UNFINISHED) + "/"), key=lambda o: o.modified,
                       reverse=True)
        if len(aside) > keep:
            self.ctx.store.delete_many([o.key for o in aside[keep:]])

    def due(self, step: int) -> bool:
        return bool(self.keep_every) and step % self.keep_every == 0

    def save(self, state: dict[str, Any]) -> None:
        path = self.ctx.scratch / RESUMABLE
        payload = plain({**state, "cache_key": self.ctx.cache_key, "continuation": self.ctx.continuation,
                         "forced_by": self.ctx.force_run})
        if self.due(state["step"]):
            save_file(payload, path)
            rel = f"{PUBLISHED}/step-{state['step']:08d}.pt"
            entry = FileEntry(path.stat().st_size, sha256_file(path))
            self.ctx.store.upload_file(path, self.ctx.outputs.key(rel))
            self.ctx.outputs.record(rel, entry)
            self.published.append({"step": state["step"], "file": rel, "size": entry.size, "sha256": entry.sha256})
        save_file({**payload, "published": plain(self.published)}, path)
        self.ctx.store.upload_file(path, self.key)
        path.unlink()

    def clear(self) -> None:
        self.ctx.store.delete(self.key)

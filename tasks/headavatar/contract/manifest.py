"""The manifest: the record a stage writes LAST, and the only proof that a stage is done."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MANIFEST_SCHEMA = 1
# Manifests written before stages had code versions were all made by version 1 of their stage.
FIRST_CODE_VERSION = 1
# The torch devices ("cpu" | "cuda:N") chosen by headavatar.devices.resolve_device since the running
# stage began (run_stage empties it at the start and reads it into the manifest at the end).
_devices_chosen: list[str] = []


def record_device(device: str) -> None:
    """Note that the stage running in this process runs on ``device``; its manifest records it."""
    _devices_chosen.append(device)


def take_devices() -> str:
    """The devices chosen since the last call, comma-separated ("" for none), and forget them."""
    chosen = ",".join(dict.fromkeys(_devices_chosen))
    _devices_chosen.clear()
    return chosen


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON form: equal for equal content, whatever the key order."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    stage: str
    capture: str
    package_version: str
    config_digest: str
    config: dict[str, Any]
    inputs: dict[str, str]
    files: dict[str, FileEntry]
    metrics: dict[str, float] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    wall_time_s: float = 0.0
    schema: int = MANIFEST_SCHEMA
    code_version: int = FIRST_CODE_VERSION
    volatile: list[str] = field(default_factory=list)  # listed files left out of the content digest
    # The torch device the stage ran on ("cpu", "cuda:0"; "" for a stage that chose none): an operator sees
    # a GPU stage that trained on the CPU. Not part of any digest.
    device: str = ""
    # When the result was set aside as a variant (contract/variants.py); "" while it is the live result.
    kept_at: str = ""
    # The orchestrator run that forced this result's computation (``--force-run``): that run's retries take it
    # as a cache hit instead of recomputing it again. Not part of any digest.
    forced_by: str = ""

    @property
    def content_digest(self) -> str:
        """What downstream stages key their cache on: the files alone, less the volatile ones.

        Re-running a stage that rewrites byte-identical outputs therefore keeps every downstream
        cache valid, while any changed byte invalidates them. Volatile files (telemetry such as
        CPU samples, different on every run) count by name only, so a recomputed identical model
        does not invalidate downstream caches. A manifest without volatile files digests exactly
        as before they existed.
        """
        volatile = set(self.volatile)
        d: dict[str, Any] = {"stage": self.stage, "files": {
            k: asdict(v) for k, v in sorted(self.files.items()) if k not in volatile}}
        if volatile:
            d["volatile"] = sorted(volatile)
        return digest(d)

    def stale_reasons(self, inputs: dict[str, str], config_digest: str, config: dict[str, Any],
                      code_version: int) -> list[str]:
        """Why this manifest is not what a run now would produce (empty: it still is)."""
        reasons = []
        if self.schema != MANIFEST_SCHEMA:
            reasons.append(f"manifest schema {self.schema}, now {MANIFEST_SCHEMA}")
        if self.code_version != code_version:
            reasons.append(f"code version {self.code_version}, now {code_version}")
        if self.config_digest != config_digest:
            changed = sorted(changed_keys(self.config, config)) or ["(digest)"]
            reasons.append("config " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else ""))
        changed_inputs = sorted(k for k in {*self.inputs, *inputs} if self.inputs.get(k) != inputs.get(k))
        if changed_inputs:
            reasons.append("inputs " + ", ".join(changed_inputs))
        return reasons

    def matches(self, inputs: dict[str, str], config_digest: str, code_version: int) -> bool:
        return (self.schema == MANIFEST_SCHEMA and self.code_version == code_version and self.inputs == inputs
                and self.config_digest == config_digest)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["content_digest"] = self.content_digest
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        d.pop("content_digest", None)
        d["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # a later release's fields are not an error


def changed_keys(old: Any, new: Any, path: str = "") -> Iterable[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted({*old, *new}):
            yield from changed_keys(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
    elif canonical_json(old) != canonical_json(new):
        yield path

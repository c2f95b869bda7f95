"""The manifest: the record a stage writes LAST, and the only proof that a stage is done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_SCHEMA = 1


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

    @property
    def content_digest(self) -> str:
        """What downstream stages key their cache on: the files alone.

        Re-running a stage that rewrites byte-identical outputs therefore keeps every
        downstream cache valid, while any changed byte invalidates them.
        """
        return digest({"stage": self.stage, "files": {k: asdict(v) for k, v in sorted(self.files.items())}})

    def matches(self, inputs: dict[str, str], config_digest: str) -> bool:
        return self.schema == MANIFEST_SCHEMA and self.inputs == inputs and self.config_digest == config_digest

    def to_json(self) -> bytes:
        d = asdict(self)
        d["content_digest"] = self.content_digest
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        d.pop("content_digest", None)
        d["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(**d)

"""Putting a local capture (the raw layout and, for synthetic captures, its ground truth) into the bucket as
a capture provider does, under its own id or another, and reading back what its stages made as content
digests: the tests' and the load benchmark's captures."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from headavatar.contract.stage import read_manifest
from headavatar.layout import GROUND_TRUTH, RAW, stage_prefix
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, write_capture
from headavatar.upload import mark_complete

TINY = {"width": 256, "height": 372}  # the tests' capture size: small enough for every stage on a CPU


def write_tiny_capture(root: Path, layout: str = "v1") -> Path:
    """The tests' capture 018 under ``root`` (raw layout and ground truth): 16 cameras, 2 sequences of 20 frames
    at 256x372, in NeRSemble's v1 or v2 layout."""
    write_capture(SyntheticSpec("018", frames=20, sequences=("EXP-1-head", "EXP-2-eyes"), layout=layout, **TINY),
                  root / RAW)
    return root


def upload_capture(store: ObjectStore, root: Path, complete: bool = True) -> None:
    """Upload a local raw layout; ``complete`` then writes each capture's ``_COMPLETE`` marker, as users do."""
    store.upload_tree(root / RAW, store.key(RAW))
    if (root / GROUND_TRUTH).exists():
        store.upload_tree(root / GROUND_TRUTH, store.key(GROUND_TRUTH))
    if complete:
        for layout, folder in (("v1", root / RAW / "camera_params"), ("v2", root / RAW / "v2")):
            for capture in sorted(p.name for p in folder.glob("*") if p.is_dir()):
                mark_complete(store, capture, layout)


def upload_capture_as(store: ObjectStore, root: Path, capture_id: str, scratch: Path, source_id: str = "018") -> None:
    """The local capture ``source_id`` under ``root`` uploaded as capture ``capture_id`` (a renamed copy made
    under ``scratch``), its marker last."""
    copy = scratch / capture_id
    shutil.copytree(root, copy)
    for path in sorted(copy.rglob(source_id), key=lambda p: -len(p.parts)):
        path.rename(path.with_name(capture_id))
    upload_capture(store, copy)


def output_digests(store: ObjectStore, capture: str, stage: str) -> dict[str, str]:
    """Digests of a finished stage's outputs, less those its manifest declares volatile (timings, CPU samples)."""
    m = read_manifest(store, capture, stage)
    if m is None:
        raise ValueError(f"{capture}: {stage} not done")
    return {rel: e.sha256 for rel, e in m.files.items() if rel not in m.volatile}


def outputs_as(store: ObjectStore, capture: str, stages: tuple[str, ...], as_capture: str = "018") -> dict[
        str, dict[str, str]]:
    """Per stage, its output digests, as capture ``as_capture``'s would be, for copies of one capture: the
    avatar's description (avatar/avatar.json) names its capture, so its digest is taken with the id replaced."""
    out = {stage: output_digests(store, capture, stage) for stage in stages}
    if "gaussianhead" in out:
        described = store.get_bytes(store.key(stage_prefix(capture, "gaussianhead"), "avatar", "avatar.json"))
        if hashlib.sha256(described).hexdigest() != out["gaussianhead"]["avatar/avatar.json"]:
            raise ValueError(f"{capture}: avatar/avatar.json differs from its manifest")
        text = described.decode().replace(f'"capture": "{capture}"', f'"capture": "{as_capture}"')
        out["gaussianhead"]["avatar/avatar.json"] = hashlib.sha256(
            text.replace(f"/{capture}/", f"/{as_capture}/").encode()).hexdigest()
    return out

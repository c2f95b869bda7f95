"""Which captures are in the bucket and which still need the pipeline (the ingestion DAG asks this)."""

from __future__ import annotations

import logging

from headavatar.capture_id import is_capture_id
from headavatar.contract.stage import read_manifest
from headavatar.layout import RAW
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)


def raw_captures(store: ObjectStore) -> list[str]:
    """Capture ids with a ``camera_params.json`` under ``raw/camera_params/`` (the last file an upload writes)."""
    ids = []
    for name in store.list_dirs(store.key(RAW, "camera_params")):
        if not is_capture_id(name):
            log.warning("ignoring raw/camera_params/%r: not a valid capture id", name)
        elif store.exists(store.key(RAW, "camera_params", name, "camera_params.json")):
            ids.append(name)
    return sorted(ids)


def pending_captures(store: ObjectStore) -> list[str]:
    """Raw captures whose last stage has no manifest yet."""
    return [c for c in raw_captures(store) if read_manifest(store, c, STAGE_NAMES[-1]) is None]

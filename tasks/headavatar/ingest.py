"""Which captures are in the bucket, complete, and still need the pipeline (the ingestion DAG asks this).

Captures are found in both raw layouts: NeRSemble v1 (``raw/camera_params/<id>/``) and v2
(``raw/v2/<id>/``, a ``nersemble-data download`` participant folder). Complete means what stage 1
needs: ``camera_params.json`` with every configured camera, a background plate per camera, a
valid colour calibration where there is one, and at least one selected sequence with a video
from every camera (``raw.discover``, listings and the small calibration files only).
An upload still in progress fails that check and is left for
a later schedule; it is never triggered half-present.
"""

from __future__ import annotations

import logging

from headavatar.capture_id import is_capture_id
from headavatar.contract.stage import read_manifest
from headavatar.errors import RawCaptureError
from headavatar.layout import RAW, V2
from headavatar.raw import discover
from headavatar.settings import PipelineConfig
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)


def raw_captures(store: ObjectStore, config: PipelineConfig) -> list[str]:
    """Ids of the complete raw captures (incomplete ones are logged with what they lack)."""
    ids, seen = [], set()
    candidates = {(name, f"{RAW}/camera_params") for name in store.list_dirs(store.key(RAW, "camera_params"))}
    candidates |= {(name, f"{RAW}/{V2}") for name in store.list_dirs(store.key(RAW, V2))}
    for name, where in sorted(candidates):
        if not is_capture_id(name):
            log.warning("ignoring %s/%r: not a valid capture id", where, name)
            continue
        if name in seen:
            continue  # in both layouts: discover() reported that when the id was first met
        seen.add(name)
        try:
            discover(store, name, config)
        except RawCaptureError as e:
            log.info("capture %s not complete yet: %s", name, e)
            continue
        ids.append(name)
    return sorted(ids)


def pending_captures(store: ObjectStore, config: PipelineConfig) -> list[str]:
    """Complete raw captures whose last stage has no manifest yet."""
    return [c for c in raw_captures(store, config) if read_manifest(store, c, STAGE_NAMES[-1]) is None]

"""Which captures are in the bucket, complete, and still need the pipeline (the ingestion DAG asks this).

Complete means what stage 1 needs: ``camera_params.json`` with every configured camera, a
background plate per camera and at least one sequence with a video from every camera
(``raw.discover``, listings only). An upload still in progress fails that check and is left for
a later schedule; it is never triggered half-present.
"""

from __future__ import annotations

import logging

from headavatar.capture_id import is_capture_id
from headavatar.contract.stage import read_manifest
from headavatar.errors import RawCaptureError
from headavatar.layout import RAW
from headavatar.raw import discover
from headavatar.settings import PipelineConfig
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)


def raw_captures(store: ObjectStore, config: PipelineConfig) -> list[str]:
    """Ids of the complete raw captures (incomplete ones are logged with what they lack)."""
    ids = []
    for name in store.list_dirs(store.key(RAW, "camera_params")):
        if not is_capture_id(name):
            log.warning("ignoring raw/camera_params/%r: not a valid capture id", name)
            continue
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

"""Which captures are in the bucket, complete, and still need the pipeline (the ingestion DAG asks this).

Captures are found in both raw layouts: NeRSemble v1 (``raw/camera_params/<id>/``) and v2
(``raw/v2/<id>/``, a ``nersemble-data download`` participant folder). Complete means two things:

* what stage 1 needs is there: ``camera_params.json`` with every configured camera, a background
  plate per camera, a valid colour calibration where there is one, and at least one selected
  sequence with a video from every camera (``raw.discover``, listings and the small calibration
  files only);
* the upload is finished (``headavatar.upload``): its ``_COMPLETE`` marker is not older than any
  of its objects, or nothing changed for ``ingest.quiet_minutes``. A multi-sequence upload caught
  half-way passes the first check, not this one.

Pending means complete and without a finished avatar computed from the raw data as it is now:
the run id carries a short digest of the raw inputs (``ingest__<id>__<digest>``), so a capture
whose raw inputs changed since its finished run (a sequence uploaded later) gets a new run, and
one that did not is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from headavatar.capture_id import is_capture_id
from headavatar.contract.stage import read_manifest
from headavatar.errors import RawCaptureError
from headavatar.layout import RAW, V2
from headavatar.raw import RawCapture, discover
from headavatar.settings import PipelineConfig
from headavatar.stages import STAGE_NAMES
from headavatar.storage import ObjectStore
from headavatar.upload import upload_state

log = logging.getLogger(__name__)
RUN_DIGEST_CHARS = 12  # of the raw digest in a run id: collisions between two uploads of one capture are negligible


@dataclass(frozen=True)
class Pending:
    capture: str
    run_id: str  # ingest__<id>__<raw digest prefix>: one run per version of the raw inputs
    raw_digest: str
    reason: str


def complete_captures(store: ObjectStore, config: PipelineConfig) -> list[RawCapture]:
    """The complete raw captures (incomplete ones are logged with what they lack), sorted by id."""
    out, seen = [], set()
    candidates = {(name, f"{RAW}/camera_params") for name in store.list_dirs(store.key(RAW, "camera_params"))}
    candidates |= {(name, f"{RAW}/{V2}") for name in store.list_dirs(store.key(RAW, V2))}
    if not candidates:
        log.info("no capture folder under %s/camera_params/ or %s/%s/", store.uri(store.key(RAW)),
                 store.uri(store.key(RAW)), V2)
    for name, where in sorted(candidates):
        if not is_capture_id(name):
            log.warning("ignoring %s/%r: not a valid capture id", where, name)
            continue
        if name in seen:
            continue  # in both layouts: discover() reported that when the id was first met
        seen.add(name)
        try:
            raw = discover(store, name, config)
        except RawCaptureError as e:
            log.info("capture %s not complete yet: %s", name, e)
            continue
        state = upload_state(store, name, raw.layout, config.ingest)
        if not state.finished:
            log.info("capture %s not complete yet: %s", name, state.why)
            continue
        log.info("capture %s complete (%s)", name, state.why)
        out.append(raw)
    return out


def raw_captures(store: ObjectStore, config: PipelineConfig) -> list[str]:
    """Ids of the complete raw captures."""
    return [r.capture for r in complete_captures(store, config)]


def finished_raw_digest(store: ObjectStore, capture: str) -> str | None:
    """The raw digest the capture's finished avatar was computed from: the last stage's manifest,
    followed through its inputs' content digests down to stage 1's raw input. None when there is
    no finished avatar, or its manifests no longer chain (an upstream stage recomputed or removed)."""
    final = read_manifest(store, capture, STAGE_NAMES[-1])
    if final is None:
        return None
    seen, todo, raw = {final.stage}, [final], None
    while todo:
        m = todo.pop()
        for dep, value in m.inputs.items():
            if dep == RAW:
                raw = value
            elif dep in STAGE_NAMES:
                up = read_manifest(store, capture, dep)
                if up is None or up.content_digest != value:
                    return None
                if dep not in seen:
                    seen.add(dep)
                    todo.append(up)
    return raw


def pending_captures(store: ObjectStore, config: PipelineConfig) -> list[Pending]:
    """Complete captures without a finished avatar of their raw inputs as they are now. Every capture
    found gets a line in the log saying why it is or is not pending (the ingestion task's log shows it)."""
    out = []
    for raw in complete_captures(store, config):
        now = raw.digest()
        done = finished_raw_digest(store, raw.capture)
        if done == now:
            log.info("capture %s not pending: its finished avatar is of the raw inputs as they are now "
                     "(raw digest %s)", raw.capture, now[:RUN_DIGEST_CHARS])
            continue
        reason = ("no finished run" if read_manifest(store, raw.capture, STAGE_NAMES[-1]) is None
                  else "raw inputs changed since its finished run" if done
                  else "its finished run's manifests do not chain to the raw data")
        run_id = f"ingest__{raw.capture}__{now[:RUN_DIGEST_CHARS]}"
        log.info("capture %s pending: %s (run %s)", raw.capture, reason, run_id)
        out.append(Pending(raw.capture, run_id, now, reason))
    return out


def as_json(pending: list[Pending]) -> list[dict[str, str]]:
    return [asdict(p) for p in pending]

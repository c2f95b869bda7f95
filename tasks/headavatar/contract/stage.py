"""The stage contract, enforced here so that no stage can break it.

1. A stage declares its inputs (upstream stages, or the raw capture), the config sections it
   reads and its code version; its cache key is the content digests of those inputs, the digest of
   those sections' result settings (``contract/config_key.py``: execution settings such as the
   device stay out) and the code version (bumped when the stage's outputs would change). Outputs it
   declares volatile (telemetry) are listed but left out of the content digest downstream stages key on.
2. It writes only under ``avatars/<capture>/<stage>/`` through :class:`OutputWriter`.
3. The old manifest is deleted BEFORE any output is touched and the new one is written LAST, after
   every upload has succeeded and stale outputs are removed, so a stage killed half-way leaves no
   manifest and is never taken as done.
4. A manifest that matches inputs + config + code version, with every listed file present at its
   size, is a cache hit: the stage is skipped unless forced. One that does not is stale. A run forced
   for an orchestrator's run (``force_run``) recomputes once: a result or checkpoint made under the
   same run counts, so that run's retries resume or hit instead of starting over.
5. Local scratch space lives in one directory removed at the end, also on errors and SIGTERM; a
   directory left by a SIGKILLed run is removed by the next run on the host.
6. One run at a time computes a (capture, stage): a lease in the bucket (``contract/lock.py``);
   a concurrent run exits 79 (waits, then a cache hit). Every write and delete of the run
   is fenced by the lease, so a run that lost it (paused past its ttl) changes nothing more, and
   the manifest is written only where none is (``If-None-Match``).
7. A result replaced by one computed under another cache key is kept as a variant
   (``contract/variants.py``); a run whose key names a kept variant brings it back as a cache hit.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from headavatar import __version__
from headavatar.capture_id import validate_capture_id
from headavatar.contract import variants
from headavatar.contract.config_key import config_key, continuation_key, result_config
from headavatar.contract.lock import StageLock, lost_lock, pid_alive
from headavatar.contract.manifest import FIRST_CODE_VERSION, Manifest, digest, take_devices
from headavatar.contract.outputs import RESERVED_PREFIX, OutputWriter, state_key
from headavatar.contract.usage import WORKER_CPU_METRIC, ResourceUsage
from headavatar.errors import MissingObject, ScratchFull, UpstreamMissing
from headavatar.layout import MANIFEST, stage_prefix
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
SCRATCH_ENV = "HEADAVATAR_SCRATCH"


@dataclass
class StageContext:
    """What a running stage may touch."""

    stage: str
    capture: str
    config: PipelineConfig
    store: ObjectStore
    scratch: Path
    upstream: dict[str, Manifest]
    inputs: dict[str, str]  # input name -> digest (upstream stages and raw inputs)
    outputs: OutputWriter
    metrics: dict[str, float] = field(default_factory=dict)
    fresh: bool = False  # --force: start over, ignoring state kept from earlier attempts
    force_run: str = ""  # --force-run: start over once for this run; its own attempts' state counts
    config_digest: str = ""
    code_version: int = FIRST_CODE_VERSION
    whole_config_digest: str = ""  # the digest of the whole sections, execution settings included
    continuation_digest: str = ""  # config_digest less the step ceilings (config_key.continuation_key)
    lease: StageLock | None = None  # what worker processes fence their writes with

    @property
    def cache_key(self) -> str:
        """What this attempt computes from: its inputs, its result settings and its code version."""
        return variants.cache_key(self.inputs, self.config_digest, self.code_version)

    @property
    def resumable_keys(self) -> frozenset[str]:
        """Keys of checkpoints this attempt may resume: its own, and the key a release that digested
        whole sections gave the same config, so upgrading does not restart a training."""
        legacy = variants.cache_key(self.inputs, self.whole_config_digest, self.code_version)
        return frozenset({self.cache_key, legacy})

    @property
    def continuation(self) -> str:
        """What a training's checkpoint must match to continue under this attempt's step ceiling: its key less
        the ceiling ("" when unknown: no continuation)."""
        if not self.continuation_digest:
            return ""
        return variants.cache_key(self.inputs, self.continuation_digest, self.code_version)

    def state_key(self, rel: str) -> str:
        """Key for state that outlives one attempt (checkpoints): never in the manifest, never stale."""
        return state_key(self.outputs.prefix, rel)

    def input_key(self, stage: str, rel: str) -> str:
        """Key of an upstream output; it must be listed in that stage's manifest."""
        if rel not in self.upstream[stage].files:
            raise MissingObject(f"{rel!r} is not an output of stage {stage!r} for capture {self.capture}")
        return self.store.key(stage_prefix(self.capture, stage), rel)


class Stage(ABC):
    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]  # upstream stage names, or ("raw",)
    config_sections: ClassVar[tuple[str, ...]]
    # Bump when a change to the stage's code would change its outputs (a bug fix, a new output):
    # manifests of other versions are stale and recompute. Not for refactors or speed-ups.
    code_version: ClassVar[int] = FIRST_CODE_VERSION
    # Outputs (fnmatch patterns) whose bytes differ between runs of the same computation, such as
    # CPU samples: listed with size and digest, but not part of the content digest.
    volatile_outputs: ClassVar[tuple[str, ...]] = ()

    def prepare(self, config: PipelineConfig) -> None:
        """Start slow set-up that needs no input (worker processes), overlapping the cache check.

        It may be wasted: the stage can still turn out to be a cache hit.
        """
        return None

    def raw_inputs(self, store: ObjectStore, capture: str, config: PipelineConfig) -> dict[str, str]:
        """Digests of non-stage inputs (the raw capture); stages reading only stages have none."""
        return {}

    @abstractmethod
    def run(self, ctx: StageContext) -> None: ...


@dataclass(frozen=True)
class StageResult:
    stage: str
    capture: str
    cached: bool
    manifest: Manifest
    manifest_uri: str


def manifest_key(store: ObjectStore, capture: str, stage: str) -> str:
    return store.key(stage_prefix(capture, stage), MANIFEST)


def read_manifest(store: ObjectStore, capture: str, stage: str) -> Manifest | None:
    try:
        return Manifest.from_json(store.get_bytes(manifest_key(store, capture, stage)))
    except MissingObject:
        return None


def config_digest(stage: Stage, config: PipelineConfig) -> tuple[str, dict]:
    """The config part of the stage's cache key, and its sections in full (what the manifest records)."""
    sections = {s: config.section(s).model_dump(mode="json") for s in stage.config_sections}
    return config_key(sections), sections


def _keyed(manifest: Manifest) -> Manifest:
    """``manifest`` as the cache check sees it: its recorded config cut to result settings and keyed anew.

    So a manifest written when keys covered whole sections counts by its result settings too."""
    results = result_config(manifest.config)
    return replace(manifest, config=results, config_digest=digest(results))


@dataclass(frozen=True)
class Expected:
    """What a run of a stage would compute from now: its cache key's parts."""

    inputs: dict[str, str]
    config_digest: str
    config: dict
    code_version: int
    upstream: dict[str, Manifest]
    missing: tuple[str, ...]  # upstream stages without a manifest

    @property
    def cache_key(self) -> str:
        return variants.cache_key(self.inputs, self.config_digest, self.code_version)


def expected(stage: Stage, capture: str, config: PipelineConfig, store: ObjectStore) -> Expected:
    """Inputs, config and code version a run of ``stage`` would use now (the cache key's parts)."""
    upstream: dict[str, Manifest] = {}
    missing: list[str] = []
    inputs: dict[str, str] = stage.raw_inputs(store, capture, config)
    for dep in stage.inputs:
        if dep == "raw":
            continue
        m = read_manifest(store, capture, dep)
        if m is None:
            missing.append(dep)
            continue
        upstream[dep] = m
        inputs[dep] = m.content_digest
    cdigest, sections = config_digest(stage, config)
    return Expected(inputs, cdigest, sections, stage.code_version, upstream, tuple(missing))


def stale_reasons(manifest: Manifest, exp: Expected) -> list[str]:
    """Why ``manifest`` is not what a run now would compute from (empty: a cache hit)."""
    return _keyed(manifest).stale_reasons(exp.inputs, exp.config_digest, result_config(exp.config),
                                          exp.code_version)


def _outputs_present(store: ObjectStore, prefix: str, manifest: Manifest) -> bool:
    sizes = {o.key[len(prefix) + 1:]: o.size for o in store.list_live(prefix, RESERVED_PREFIX)}
    return all(sizes.get(rel) == e.size for rel, e in manifest.files.items())


def _clean_stale_scratch(root: Path) -> None:
    for d in root.glob("headavatar-*-pid*"):
        pid = d.name.rsplit("-pid", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)



def run_stage(stage: Stage, capture: str, config: PipelineConfig, store: ObjectStore,
              force: bool = False, force_run: str = "") -> StageResult:
    """Run ``stage`` for ``capture`` under the contract above. ``force``: recompute; ``force_run``: recompute
    once for that orchestrator run (its id), so that a retry of a forced run resumes its own checkpoint or
    takes its own result instead of starting a training of hours over."""
    capture = validate_capture_id(capture)
    prefix = store.key(stage_prefix(capture, stage.name))

    stage.prepare(config)
    exp = expected(stage, capture, config, store)
    if exp.missing:
        dep = exp.missing[0]
        raise UpstreamMissing(
            f"stage {stage.name!r} needs stage {dep!r} for capture {capture}: no "
            f"{store.uri(manifest_key(store, capture, dep))}; run 'headavatar run {dep} --capture {capture}' first"
        )

    cached = _cache_hit(store, stage, capture, prefix, exp, force, force_run)
    if cached is not None:
        return cached
    lock = StageLock(store, state_key(prefix, "lock.json"), f"capture {capture} stage {stage.name}",
                     ttl=config.storage.lock_ttl_s)
    lock.acquire()
    store.fence_with(lock.fence)
    try:
        # A concurrent run may have finished while this one was starting: its result is ours.
        cached = _cache_hit(store, stage, capture, prefix, exp, force, force_run)
        if cached is not None:
            return cached
        if not (force or force_run) and (kept := variants.find(store, prefix, exp.cache_key)) is not None:
            return _bring_back(store, stage, capture, prefix, kept, config.storage.keep_variants, lock)
        return _compute(stage, capture, config, store, force, force_run, prefix, exp, lock)
    finally:
        store.fence_with(None)
        lock.release()


def _cache_hit(store: ObjectStore, stage: Stage, capture: str, prefix: str, exp: Expected,
               force: bool, force_run: str) -> StageResult | None:
    mkey = f"{prefix}/{MANIFEST}"
    existing = read_manifest(store, capture, stage.name)
    if existing is None or force:
        return None
    if force_run and existing.forced_by != force_run:
        log.info("%s/%s: recomputing, forced by run %s", capture, stage.name, force_run)
        return None
    if _keyed(existing).matches(exp.inputs, exp.config_digest, exp.code_version):
        if _outputs_present(store, prefix, existing):
            log.info("%s/%s: cache hit (%d files, %s)", capture, stage.name, len(existing.files), store.uri(mkey))
            return StageResult(stage.name, capture, True, existing, store.uri(mkey))
        log.warning("%s/%s: manifest matches but outputs are missing; recomputing", capture, stage.name)
    else:
        log.info("%s/%s: stale (%s); recomputing", capture, stage.name, "; ".join(stale_reasons(existing, exp)))
    return None


def _keep_outgoing(store: ObjectStore, stage: Stage, capture: str, prefix: str, new_key: str,
                   keep: int) -> Manifest | None:
    """Keep the live result as a variant if a result under ``new_key`` is about to replace it.

    Returns the live manifest when its files are all present (whether kept or not), else None."""
    live = read_manifest(store, capture, stage.name)
    if live is None or not _outputs_present(store, prefix, live):
        return None
    if keep > 0 and variants.key_of(live) != new_key:
        variants.keep(store, prefix, live)
    return live


def _bring_back(store: ObjectStore, stage: Stage, capture: str, prefix: str, kept: Manifest, keep: int,
                lock: StageLock) -> StageResult:
    """A cache hit from a kept variant: it becomes the live result, the outgoing one is kept instead."""
    key = variants.key_of(kept)
    mkey = f"{prefix}/{MANIFEST}"
    live = _keep_outgoing(store, stage, capture, prefix, key, keep)
    store.delete(mkey)
    variants.bring_back(store, prefix, kept, live)
    _remove_unlisted(store, capture, stage, prefix, kept.files)
    lock.fence(renew=True)
    kept = replace(kept, kept_at="")
    if not store.put_new(mkey, kept.to_json(), content_type="application/json"):
        raise lost_lock(lock.what, store.uri(lock.key))
    variants.prune(store, prefix, keep, live=key)
    log.info("%s/%s: cache hit: variant %s of %s brought back (%d files, %s)", capture, stage.name,
             key[:variants.KEY_CHARS], kept.finished_at, len(kept.files), store.uri(mkey))
    return StageResult(stage.name, capture, True, kept, store.uri(mkey))


def _remove_unlisted(store: ObjectStore, capture: str, stage: Stage, prefix: str, listed: dict) -> None:
    """Delete live outputs the new result does not list (stage-private ``_`` folders stay)."""
    stale = [o.key for o in store.list_live(prefix, RESERVED_PREFIX) if o.key[len(prefix) + 1:] not in listed]
    if stale:
        log.info("%s/%s: removing %d stale outputs", capture, stage.name, len(stale))
        store.delete_many(stale)


def _compute(stage: Stage, capture: str, config: PipelineConfig, store: ObjectStore, force: bool, force_run: str,
             prefix: str, exp: Expected, lock: StageLock) -> StageResult:
    inputs, cdigest = exp.inputs, exp.config_digest
    mkey = f"{prefix}/{MANIFEST}"
    _keep_outgoing(store, stage, capture, prefix, exp.cache_key, config.storage.keep_variants)
    store.delete(mkey)  # from here on the stage is "not done" until the new manifest lands
    if aborted := store.abort_multipart_uploads(prefix):  # we hold the lease: no one else uploads here
        log.info("%s/%s: aborted %d unfinished multipart uploads of an earlier attempt", capture, stage.name, aborted)

    scratch_root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    scratch_root.mkdir(parents=True, exist_ok=True)
    _clean_stale_scratch(scratch_root)
    scratch = Path(tempfile.mkdtemp(prefix=f"headavatar-{stage.name}-{capture}-", suffix=f"-pid{os.getpid()}",
                                    dir=scratch_root))
    started, t0 = datetime.now(UTC), time.monotonic()
    take_devices()  # the devices an earlier stage of this process chose are not this one's
    writer = OutputWriter(store, prefix)
    ctx = StageContext(stage.name, capture, config, store, scratch, exp.upstream, inputs, writer,
                       fresh=force, force_run=force_run, config_digest=cdigest, code_version=exp.code_version,
                       whole_config_digest=digest(exp.config), continuation_digest=continuation_key(exp.config),
                       lease=lock)
    log.info("%s/%s: running (inputs %s)", capture, stage.name, ", ".join(inputs) or "none")
    usage = ResourceUsage()
    try:
        stage.run(ctx)
        writer.wait()
        used = usage.finish(scratch)  # cpu_s, peak_rss_mb, scratch_mb, gpu_s: docs/capacity.md
    except BaseException as e:
        # Uploads already under way end before scratch goes and the error propagates, so what a
        # failed stage did write (a report to read) is complete; no manifest follows either way.
        writer.drain()
        if not isinstance(e, OSError) or e.errno != errno.ENOSPC:
            raise
        raise ScratchFull(f"{capture}/{stage.name}: the scratch directory {scratch_root} is full ({e.strerror}); "
                          f"free space there or point {SCRATCH_ENV} at a larger disk") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    _remove_unlisted(store, capture, stage, prefix, writer.entries)

    wall = time.monotonic() - t0
    metrics = {"files": float(len(writer.entries)),
               "bytes": float(sum(e.size for e in writer.entries.values())), **used, **ctx.metrics}
    metrics["cpu_s"] = round(used["cpu_s"] + ctx.metrics.get(WORKER_CPU_METRIC, 0.0), 2)
    manifest = Manifest(
        stage=stage.name, capture=capture, package_version=__version__, config_digest=cdigest,
        config=exp.config, inputs=inputs, files=dict(sorted(writer.entries.items())), metrics=metrics,
        started_at=started.isoformat(), finished_at=datetime.now(UTC).isoformat(), wall_time_s=round(wall, 3),
        code_version=exp.code_version, device=take_devices(), forced_by=force_run,
        volatile=sorted(rel for rel in writer.entries
                        if any(fnmatch.fnmatchcase(rel, pat) for pat in stage.volatile_outputs)),
    )
    lock.fence(renew=True)
    if not store.put_new(mkey, manifest.to_json(), content_type="application/json"):
        raise lost_lock(lock.what, store.uri(lock.key))  # another run's manifest is there: never replaced
    variants.prune(store, prefix, config.storage.keep_variants, live=exp.cache_key)
    log.info("%s/%s: done in %.1fs, %d files -> %s", capture, stage.name, wall, len(writer.entries), store.uri(mkey))
    return StageResult(stage.name, capture, False, manifest, store.uri(mkey))

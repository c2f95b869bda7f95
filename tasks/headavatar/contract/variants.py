"""Earlier results of a stage, kept beside the live one under their cache key.

A stage's live outputs sit in ``avatars/<capture>/<stage>/`` (what downstream stages and users
read). When a run with other result settings or other inputs replaces them, the outgoing result is
first copied (server-side) to ``_variants/<key>/`` in the same folder, its manifest written last as
everywhere else. A later run whose cache key names a kept variant brings it back instead of
computing it again, so going back to earlier settings is a cache hit, and two avatars of one capture
trained with different settings both stay in the bucket. ``storage.keep_variants`` bounds how many
are kept per stage; the oldest go first.

Every function here runs under the stage's lease (``contract/lock.py``), fenced like any write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from headavatar.contract.config_key import result_config
from headavatar.contract.manifest import Manifest, digest
from headavatar.contract.outputs import RESERVED_PREFIX
from headavatar.errors import MissingObject
from headavatar.layout import MANIFEST
from headavatar.storage import ObjectStore

log = logging.getLogger(__name__)
VARIANTS = f"{RESERVED_PREFIX}variants"
KEY_CHARS = 16  # of the cache key's sha256 hex: folder names people can read; a match is checked in full


def cache_key(inputs: dict[str, str], config_digest: str, code_version: int) -> str:
    """What a result is computed from: its inputs' digests, its result settings' digest, its code version."""
    return digest({"inputs": inputs, "config": config_digest, "code": code_version})


def key_of(manifest: Manifest) -> str:
    """The cache key ``manifest``'s result was computed under (judged by its result settings)."""
    return cache_key(manifest.inputs, digest(result_config(manifest.config)), manifest.code_version)


def folder(prefix: str, key: str) -> str:
    """Where the variant with cache key ``key`` of the stage at ``prefix`` is kept."""
    return f"{prefix}/{VARIANTS}/{key[:KEY_CHARS]}"


@dataclass(frozen=True)
class Variant:
    key: str  # the first KEY_CHARS characters of its cache key
    manifest: Manifest


def _manifest(store: ObjectStore, where: str) -> Manifest | None:
    try:
        return Manifest.from_json(store.get_bytes(f"{where}/{MANIFEST}"))
    except MissingObject:  # being written or removed, or an empty folder the store still lists
        return None


def kept(store: ObjectStore, prefix: str, names: list[str] | None = None) -> list[Variant]:
    """The whole variants kept for the stage at ``prefix`` (of the folders ``names``, default all), newest
    first (a half-written one has no manifest)."""
    names = store.list_dirs(f"{prefix}/{VARIANTS}") if names is None else names
    out = [Variant(n, m) for n in names if (m := _manifest(store, folder(prefix, n))) is not None]
    return sorted(out, key=lambda v: (v.manifest.kept_at, v.manifest.finished_at), reverse=True)


def find(store: ObjectStore, prefix: str, key: str) -> Manifest | None:
    """The kept variant computed under cache key ``key``, if it is whole (every file present at its size)."""
    where = folder(prefix, key)
    m = _manifest(store, where)
    if m is None or key_of(m) != key:
        return None
    sizes = {o.key[len(where) + 1:]: o.size for o in store.list(where)}
    return m if all(sizes.get(rel) == e.size for rel, e in m.files.items()) else None


def keep(store: ObjectStore, prefix: str, live: Manifest) -> None:
    """Copy the live result to its variant folder, its manifest last (an interrupted copy is no variant)."""
    where = folder(prefix, key_of(live))
    store.delete(f"{where}/{MANIFEST}")
    store.map(lambda rel: store.copy(f"{prefix}/{rel}", f"{where}/{rel}", live.files[rel].size), list(live.files))
    _remove(store, [o.key for o in store.list(where) if o.key[len(where) + 1:] not in live.files])
    kept_at = datetime.now(UTC).isoformat()
    store.put_bytes(f"{where}/{MANIFEST}", replace(live, kept_at=kept_at).to_json(), content_type="application/json")
    log.info("%s/%s: kept the outgoing result as variant %s", live.capture, live.stage, where.rsplit("/", 1)[-1])


def bring_back(store: ObjectStore, prefix: str, variant: Manifest, live: Manifest | None) -> None:
    """Copy ``variant``'s files to the live folder, whose manifest must already be deleted.

    Files the outgoing live result has with the same digest are not copied again. The caller
    removes what the variant does not list, writes the live manifest last, then ``drop``s the variant.
    """
    where = folder(prefix, key_of(variant))
    same = {rel for rel, e in variant.files.items() if live is not None and live.files.get(rel) == e}
    store.map(lambda rel: store.copy(f"{where}/{rel}", f"{prefix}/{rel}", variant.files[rel].size),
              [rel for rel in variant.files if rel not in same])


def drop(store: ObjectStore, prefix: str, key: str) -> None:
    """Remove the variant kept under ``key``: its manifest first, so a half-removed one is no variant."""
    where = folder(prefix, key)
    store.delete(f"{where}/{MANIFEST}")
    _remove(store, [o.key for o in store.list(where)])


def prune(store: ObjectStore, prefix: str, count: int, live: str) -> list[str]:
    """Keep the ``count`` newest whole variants of the stage other than the ``live`` key's; remove the
    others (and half-written ones)."""
    names = store.list_dirs(f"{prefix}/{VARIANTS}")
    whole = [v for v in kept(store, prefix, names) if v.key != live[:KEY_CHARS]]
    gone = sorted(set(names) - {v.key for v in whole[:count]})
    for name in gone:
        drop(store, prefix, name)
    return gone


def _remove(store: ObjectStore, keys: Iterable[str]) -> None:
    keys = list(keys)
    if keys:
        store.delete_many(keys)

"""User-supplied model files (matting weights, the BFM): a local path or an s3:// key in our bucket.

Their content identity is part of the consuming stage's cache key, so replacing a file under the
same name re-runs the stage instead of serving results made with the old file.
"""

from __future__ import annotations

from pathlib import Path

from headavatar.errors import ConfigError, MissingObject
from headavatar.storage import ObjectStore, sha256_file


def _s3_key(store: ObjectStore, ref: str, setting: str) -> str:
    bucket, _, key = ref[5:].partition("/")
    if bucket != store.bucket or not key:
        raise ConfigError(f"{setting} must be s3://{store.bucket}/<key> or a local path, got {ref}")
    return key


def asset_identity(store: ObjectStore, ref: str, setting: str, hint: str = "") -> str:
    """ETag of the object or sha256 of the local file; a missing file is a one-line ConfigError."""
    if ref.startswith("s3://"):
        info = store.head(_s3_key(store, ref, setting))
        if info is None:
            raise ConfigError(f"{setting}: {ref} does not exist{hint}")
        return f"{info.size}:{info.etag}"
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"{setting}: {ref} does not exist{hint}")
    return sha256_file(path)


def fetch_asset(store: ObjectStore, ref: str, setting: str, scratch: Path, hint: str = "") -> Path:
    """A local path to the file (downloaded into scratch when it lives in the bucket)."""
    if not ref.startswith("s3://"):
        if not Path(ref).is_file():
            raise ConfigError(f"{setting}: {ref} does not exist{hint}")
        return Path(ref)
    key = _s3_key(store, ref, setting)
    try:
        return store.download_file(key, scratch / "assets" / Path(key).name)
    except MissingObject:
        raise ConfigError(f"{setting}: {ref} does not exist{hint}") from None

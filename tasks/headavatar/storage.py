"""Object storage through boto3: any S3-compatible server (AWS S3, MinIO, SeaweedFS).

Large files go multipart through s3transfer; batches of small objects run on a thread pool.
Errors come back as :class:`~headavatar.errors.StorageError` subclasses naming the ``s3://`` URI.

A store can be fenced (:meth:`ObjectStore.fence_with`): every request that writes or deletes,
each retry and each part of a multipart upload included, first calls the fence, which raises when
the stage run lost its lease (``contract/lock.py``), so a run that lost its lease changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from headavatar.errors import AccessDenied, MissingObject, StorageError, StorageUnavailable
from headavatar.settings import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1024 * 1024
# Requests that change the bucket (PutObject, parts, CompleteMultipartUpload, DeleteObject(s), copies).
WRITE_METHODS = frozenset({"PUT", "POST", "DELETE"})


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float = 0.0  # LastModified, Unix seconds (ingestion's quiet window and completion marker)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 4 * MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gather(futures: Iterable[Future[T]]) -> list[T]:
    """Results in order; the first error is raised only after every future has finished."""
    results, first_error = [], None
    for f in futures:
        try:
            results.append(f.result())
        except Exception as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return results


class RangeReader(io.RawIOBase):
    """A seekable, read-only file over ranged reads (an S3 object), read in blocks of ``block`` bytes.

    Reading an MP4's header this way costs a few requests (the ``moov`` box, often at the end, and
    the first packets), not the whole video.
    """

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], block: int = 1 << 20) -> None:
        super().__init__()
        self.size, self._fetch, self._block = size, fetch, block
        self._pos, self._start, self._data = 0, 0, b""
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._pos >= self.size or not len(buffer):
            return 0
        if not self._start <= self._pos < self._start + len(self._data):
            end = min(self.size, self._pos + max(self._block, len(buffer))) - 1  # inclusive, as HTTP ranges
            self._start, self._data = self._pos, self._fetch(self._pos, end)
            self.requests += 1
            if not self._data:
                return 0
        offset = self._pos - self._start
        n = min(len(buffer), len(self._data) - offset)
        buffer[:n] = self._data[offset:offset + n]
        self._pos += n
        return n


class ObjectStore:
    """One bucket, seen through a key prefix. Thread-safe: boto3 clients may be shared."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.client = self.new_client()
        self._fence: Callable[[], None] | None = None
        self.client.meta.events.register("before-send.s3", self._before_send)
        self.transfer = TransferConfig(
            multipart_threshold=cfg.multipart_threshold_mb * MB,
            multipart_chunksize=cfg.multipart_chunk_mb * MB,
            max_concurrency=cfg.max_concurrency,
            use_threads=True,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def new_client(self, attempts: int | None = None, connect_timeout: float = 10, read_timeout: float = 120):
        """A boto3 S3 client for this store's server (the store's own, or an unfenced one for a lease)."""
        cfg = self.cfg
        return boto3.session.Session().client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            config=Config(
                retries={"max_attempts": attempts or cfg.max_attempts, "mode": "standard"},
                max_pool_connections=max(cfg.max_concurrency * 2, 10),
                s3={"addressing_style": "path"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    # --- fencing -------------------------------------------------------------------------
    def fence_with(self, fence: Callable[[], None] | None) -> None:
        """Call ``fence`` before every request that writes or deletes (None: no fence)."""
        self._fence = fence

    def _before_send(self, request, **_: object) -> None:
        if self._fence is not None and request.method in WRITE_METHODS:
            self._fence()

    # --- keys ----------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        """Join ``parts`` under the configured prefix."""
        return "/".join(p.strip("/") for p in (self.cfg.prefix, *parts) if p.strip("/"))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- error mapping -------------------------------------------------------------------
    def _error(self, exc: Exception, key: str, action: str) -> StorageError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return MissingObject(f"missing object {self.uri(key)}")
            if code == "NoSuchBucket":
                return MissingObject(f"bucket {self.bucket!r} does not exist ({self.uri(key)})")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                return AccessDenied(f"access denied to {action} {self.uri(key)} ({code})")
            if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout") or (status or 0) >= 500:
                return StorageUnavailable(f"cannot {action} {self.uri(key)}: the object store answered "
                                          f"{code or status}")
            return StorageError(f"cannot {action} {self.uri(key)}: {code or status}")
        if isinstance(exc, NoCredentialsError):
            return AccessDenied(f"cannot {action} {self.uri(key)}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY (after make demo: source .headavatar/demo/s3.env)")
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # refused, reset, timed out: after all retries
            return StorageUnavailable(f"cannot {action} {self.uri(key)}: object store unreachable "
                                      f"({type(exc).__name__})")
        return StorageError(f"cannot {action} {self.uri(key)}: {type(exc).__name__}: {exc}")

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, action) from e
        except S3UploadFailedError as e:  # s3transfer's wrapper (it has aborted the multipart upload)
            cause = e.__cause__ or e.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                raise self._error(cause, key, action) from e
            transient = any(c in str(e) for c in ("InternalError", "ServiceUnavailable", "SlowDown", "connect"))
            cls = StorageUnavailable if transient else StorageError
            raise cls(f"cannot {action} {self.uri(key)}: {str(e).rsplit(': ', 1)[-1][:200]}") from e

    # --- single objects ------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra))

    def put_new(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Write ``key`` only where no object is (``If-None-Match: *``): False when another one already was.

        A retry whose first attempt did land (its answer lost) finds its own bytes: that counts as written."""
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*", **extra)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                try:
                    return self.get_bytes(key) == data
                except MissingObject:  # deleted since: not written by this call either
                    return False
            raise self._error(e, key, "write") from e
        except BotoCoreError as e:
            raise self._error(e, key, "write") from e
        return True

    def get_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def upload_file(self, path: Path, key: str) -> None:
        """Multipart above the threshold; a failed multipart upload is aborted by s3transfer."""
        self._call("write", key, lambda: self.client.upload_file(str(path), self.bucket, key, Config=self.transfer))

    def upload_stream(self, stream: BinaryIO, key: str) -> None:
        """From any readable stream (an archive member), multipart above the threshold, never whole in memory."""
        self._call("write", key, lambda: self.client.upload_fileobj(stream, self.bucket, key, Config=self.transfer))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start``..``end`` inclusive."""
        return self._call("read", key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"].read())

    def range_reader(self, obj: ObjectInfo, block: int = 1 << 20) -> RangeReader:
        """The object as a seekable file read by ranged GETs (a video's header, a zip's members)."""
        return RangeReader(obj.size, lambda start, end: self.get_range(obj.key, start, end), block)

    def download_file(self, key: str, path: Path) -> Path:
        """Download to ``path`` atomically: a partial download never appears under its name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            self._call("read", key, lambda: self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def copy(self, src_key: str, dst_key: str, size: int | None = None) -> None:
        """Server-side copy: no bytes pass through here. Objects known to be below the multipart
        threshold take one CopyObject request; the managed copy first HEADs the source and sets
        up a transfer manager per call, which made small copies three times slower."""
        source = {"Bucket": self.bucket, "Key": src_key}
        if size is not None and size < self.transfer.multipart_threshold:
            self._call("copy to", dst_key, lambda: self.client.copy_object(CopySource=source, Bucket=self.bucket,
                                                                              Key=dst_key))
            return
        self._call("copy to", dst_key, lambda: self.client.copy(source, self.bucket, dst_key, Config=self.transfer))

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            err = self._error(e, key, "stat")
            if isinstance(err, MissingObject):
                return None
            raise err from e
        except BotoCoreError as e:
            raise self._error(e, key, "stat") from e
        return ObjectInfo(key, r["ContentLength"], r["ETag"].strip('"'), r["LastModified"].timestamp())

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def abort_multipart_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under ``prefix`` (parts a killed process left behind)."""
        prefix = prefix.rstrip("/") + "/"
        uploads = self._call("list uploads under", prefix, lambda: self.client.list_multipart_uploads(
            Bucket=self.bucket, Prefix=prefix).get("Uploads", []))
        for u in uploads:
            self._call("abort upload of", u["Key"], lambda u=u: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]))
        return len(uploads)

    # --- many objects --------------------------------------------------------------------
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects under ``prefix`` (a folder: a trailing '/' is added)."""
        prefix = prefix.rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"], o["Size"], o["ETag"].strip('"'), o["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, prefix, "list") from e

    def list_live(self, prefix: str, reserved: str) -> Iterator[ObjectInfo]:
        """All objects under ``prefix`` except the immediate children whose name starts with ``reserved``:
        objects skipped, folders (a stage's kept variants and state) not listed at all."""
        prefix = prefix.rstrip("/") + "/"
        folders: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for o in page.get("Contents", []):
                    if not o["Key"][len(prefix):].startswith(reserved):
                        yield ObjectInfo(o["Key"], o["Size"], o["ETag"].strip('"'), o["LastModified"].timestamp())
                folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, prefix, "list") from e
        for folder in folders:
            if not folder[len(prefix):].startswith(reserved):
                yield from self.list(folder)

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix``."""
        prefix = prefix.rstrip("/") + "/"
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, prefix, "list") from e
        return sorted(out)

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = self._call(
                "delete", batch[0],
                lambda b=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in b], "Quiet": True}
                ),
            )
            if r.get("Errors"):
                e = r["Errors"][0]
                raise StorageError(f"cannot delete {self.uri(e['Key'])}: {e.get('Code')}")
        return len(keys)

    @property
    def pool(self) -> ThreadPoolExecutor:
        """A shared pool for concurrent small transfers (boto3 clients are thread-safe)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cfg.max_concurrency, thread_name_prefix="s3")
            return self._pool

    def submit_all(self, fn: Callable[..., T], *iterables: Iterable) -> list[Future[T]]:
        """Start ``fn`` over the items on the shared pool; :func:`gather` collects them."""
        return [self.pool.submit(fn, *args) for args in zip(*iterables, strict=True)]

    def map(self, fn: Callable[..., T], *iterables: Iterable) -> list[T]:
        """Run ``fn`` over the items concurrently; the first error is raised after all finish."""
        return gather(self.submit_all(fn, *iterables))

    def download_many(self, pairs: Iterable[tuple[str, Path]]) -> list[Path]:
        pairs = list(pairs)
        return self.map(self.download_file, [k for k, _ in pairs], [p for _, p in pairs])

    def upload_tree(self, root: Path, prefix: str) -> list[str]:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file())
        keys = [f"{prefix.rstrip('/')}/{p.relative_to(root).as_posix()}" for p in files]
        self.map(self.upload_file, files, keys)
        return keys

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create bucket", "", lambda: self.client.create_bucket(Bucket=self.bucket))

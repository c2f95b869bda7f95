"""ObjectStore against the real SeaweedFS S3 server."""

import hashlib
import os
from pathlib import Path

import boto3
import pytest

from conftest import BUCKET, tiny_config
from headavatar.devserver.seaweed import EmbeddedS3
from headavatar.errors import AccessDenied, MissingObject
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3


def test_roundtrip_list_copy_delete(store: ObjectStore) -> None:
    keys = [store.key("a", f"f{i}.bin") for i in range(5)]
    store.map(store.put_bytes, keys, [bytes([i]) * (i + 1) for i in range(5)])
    assert [o.key for o in store.list(store.key("a"))] == sorted(keys)
    assert store.get_bytes(keys[3]) == b"\x03" * 4
    store.copy(keys[4], store.key("b", "copy.bin"))
    assert store.get_bytes(store.key("b", "copy.bin")) == b"\x04" * 5
    assert store.list_dirs(store.key()) == ["a", "b"]
    assert store.delete_many(keys) == 5
    assert list(store.list(store.key("a"))) == []


def test_listing_a_stages_live_outputs_leaves_its_private_folders_unlisted(store: ObjectStore) -> None:
    live = ["manifest.json", "images/0000/a.jpg", "images/0001/b.jpg"]
    private = ["_variants/0123abcd/manifest.json", "_variants/0123abcd/images/0000/a.jpg", "_state/lock.json",
               "_note.json"]
    store.map(lambda rel: store.put_bytes(store.key("stage", rel), b"x"), live + private)
    listed = sorted(o.key for o in store.list_live(store.key("stage"), "_"))
    assert listed == sorted(store.key("stage", r) for r in live)


def test_large_files_go_multipart_and_come_back_intact(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(13 * 1024 * 1024 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    small = ObjectStore(tiny_config("storage.multipart_threshold_mb=5", "storage.multipart_chunk_mb=5").storage)
    key = small.key("big.bin")
    small.upload_file(src, key)
    info = small.head(key)
    assert info is not None and info.size == len(data)
    assert info.etag.endswith("-3"), f"expected a 3-part multipart ETag, got {info.etag}"
    back = small.download_file(key, tmp_path / "back.bin")
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not list(tmp_path.glob("*.part"))
    # Server-side multipart copy of the same object.
    small.copy(key, small.key("big-copy.bin"))
    assert small.head(small.key("big-copy.bin")).size == len(data)
    # No multipart upload left open.
    assert not small.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    small.close()


def test_missing_object_error_names_the_uri(store: ObjectStore) -> None:
    with pytest.raises(MissingObject, match=rf"s3://{BUCKET}/.*/nope\.bin"):
        store.get_bytes(store.key("nope.bin"))
    assert store.head(store.key("nope.bin")) is None


def test_prefix_without_permission_is_access_denied(s3: EmbeddedS3, store: ObjectStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_bytes(store.key("x.txt"), b"hello")
    reader = s3.identities[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader.secret_key)
    ro = ObjectStore(tiny_config().storage)
    assert ro.get_bytes(store.key("x.txt")) == b"hello"
    with pytest.raises(AccessDenied, match="access denied to write s3://"):
        ro.put_bytes(store.key("y.txt"), b"nope")


def test_missing_credentials_say_how_to_set_them(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """No key pair anywhere (a new shell after `make demo`): one line that says what to set and where the
    demo's values are, not botocore's NoCredentialsError."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = ObjectStore(tiny_config().storage)
    try:
        with pytest.raises(AccessDenied, match=r"no S3 credentials; set AWS_ACCESS_KEY_ID .*source "
                                               r"\.headavatar/demo/s3\.env"):
            st.get_bytes(st.key("anything"))
    finally:
        st.close()


def test_wrong_credentials_are_refused(s3: EmbeddedS3) -> None:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="AKNOTAKEY", aws_secret_access_key="wrong")
    with pytest.raises(client.exceptions.ClientError):
        client.list_objects_v2(Bucket=BUCKET)


def test_the_embedded_server_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    """SeaweedFS puts its local and gRPC sockets in /tmp, where they outlive it; the embedded server keeps
    the ones it can place in its data folder and removes the others when it stops: /tmp is as it was."""
    import tempfile

    tmp = Path(tempfile.gettempdir())

    def ours() -> set[str]:
        return {p.name for p in tmp.glob("seaweedfs-*")}

    before = ours()  # other servers' sockets, e.g. of tests running beside this one, left alone
    s3 = EmbeddedS3(tmp_path / "s3").start()
    try:
        assert {p.name for p in (tmp_path / "s3").glob("*.sock")} == {"filer.sock", "s3.sock"}
        assert ours() - before  # its gRPC sockets: in /tmp whatever it is told
    finally:
        s3.stop()
    assert ours() == before

"""Ingestion: NeRSemble .zip deliveries unpacked S3 to S3, and only complete captures reported."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from conftest import cli, upload_capture, zip_capture
from headavatar.layout import RAW
from headavatar.storage import ObjectStore


def upload_archives(store: ObjectStore, folder: Path) -> None:
    for z in sorted(folder.glob("*.zip")):
        store.upload_file(z, store.key(RAW, z.name))


def captures(env: dict[str, str]) -> list[str]:
    r = cli("captures", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.s3
def test_zip_deliveries_unpack_into_the_raw_layout_once(store: ObjectStore, tiny_capture: Path,
                                                       s3_env: dict[str, str], tmp_path: Path) -> None:
    expected = zip_capture(tiny_capture / RAW, "021", tmp_path / "zips")
    upload_archives(store, tmp_path / "zips")
    assert captures(s3_env) == []  # archives only: nothing usable yet

    r = cli("unpack", env=s3_env)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["unpacked"]) == 4 and not result["failed"]
    for rel, sha in expected.items():
        assert hashlib.sha256(store.get_bytes(store.key(RAW, rel))).hexdigest() == sha, rel
    assert captures(s3_env) == ["021"]
    assert cli("validate", "--capture", "021", env=s3_env).returncode == 0

    again = json.loads(cli("unpack", env=s3_env).stdout.strip().splitlines()[-1])
    assert again == {"unpacked": [], "skipped": result["unpacked"], "failed": []}
    assert all(store.exists(store.key(RAW, z.name)) for z in (tmp_path / "zips").glob("*.zip"))  # kept


@pytest.mark.s3
def test_bad_archives_fail_clearly_and_write_nothing(store: ObjectStore, s3_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    evil = tmp_path / "sequence_EXP-1-head_part-1.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("018/EXP-1-head/cam_222200036.mp4", b"video")
        zf.writestr("../../avatars/018/extract/manifest.json", b"{}")
    good = tmp_path / "camera_params.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("030/camera_params.json", b"{}")
    store.upload_file(evil, store.key(RAW, evil.name))
    store.upload_file(good, store.key(RAW, good.name))
    store.put_bytes(store.key(RAW, "truncated.zip"), good.read_bytes()[:40])

    r = cli("unpack", env=s3_env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: 2 archive(s) could not be unpacked"), r.stderr[-2000:]
    assert "unsafe path '../../avatars/018/extract/manifest.json'" in r.stderr
    assert "truncated.zip: not a readable zip archive" in r.stderr
    keys = {o.key[len(store.key()) + 1:] for o in store.list(store.key())}
    assert "raw/camera_params/030/camera_params.json" in keys  # the good archive was still unpacked
    assert not any("EXP-1-head/cam_" in k or k.startswith("avatars/") for k in keys)  # nothing of the bad one


@pytest.mark.s3
def test_only_complete_captures_are_reported(store: ObjectStore, tiny_capture: Path,
                                             s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    raw = store.key(RAW)
    # 022: a copy of 018 whose upload is still running: one camera of one sequence has not arrived.
    for o in store.list(raw):
        rel = o.key[len(raw) + 1:]
        if "/018/" in rel and not rel.endswith("EXP-2-eyes/cam_222200036.mp4"):
            store.copy(o.key, f"{raw}/{rel.replace('/018/', '/022/')}")
    # 023: camera parameters only.
    store.copy(store.key(RAW, "camera_params/018/camera_params.json"),
               store.key(RAW, "camera_params/023/camera_params.json"))
    r = cli("captures", env=s3_env)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["018"]
    assert "capture 022 not complete yet: sequence sequence_EXP-2-eyes_part-1 of capture 022 has no video " \
           "for camera(s) 222200036" in r.stderr
    assert "capture 023 not complete yet: capture 023: missing background plate" in r.stderr

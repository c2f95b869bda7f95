"""Ingestion: NeRSemble .zip deliveries unpacked S3 to S3, and only complete captures reported."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from conftest import cli, tiny_config, upload_capture, zip_capture
from headavatar.layout import RAW
from headavatar.storage import ObjectStore
from headavatar.upload import mark_complete


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
    mark_complete(store, "021", "v1")  # the delivery is whole: marked after its archives
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


def _subset(tiny_capture: Path, out: Path, skip: str) -> Path:
    """A copy of the local capture without the files whose path contains ``skip`` (not yet uploaded)."""
    for src in tiny_capture.rglob("*"):
        if src.is_file() and skip not in src.as_posix():
            dst = out / src.relative_to(tiny_capture)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return out


def pending(env: dict[str, str], *sets: str) -> tuple[list[dict[str, str]], str]:
    r = cli("captures", "--pending", "--profile", "demo", *(a for s in sets for a in ("--set", s)), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def raw_digest(env: dict[str, str]) -> str:
    r = cli("validate", "--capture", "018", "--profile", "demo", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["digest"]


@pytest.mark.s3
def test_a_half_uploaded_multi_sequence_capture_waits_for_its_marker(store: ObjectStore, tiny_capture: Path,
                                                                     s3_env: dict[str, str], tmp_path: Path) -> None:
    # EXP-1-head is all there, EXP-2-eyes not yet: every visible sequence has all its cameras.
    upload_capture(store, _subset(tiny_capture, tmp_path / "half", "EXP-2-eyes"), complete=False)
    found, log = pending(s3_env)
    assert found == [] and captures(s3_env) == []
    assert "capture 018 not complete yet: upload not finished: no completion marker" in log
    assert "raw/camera_params/018/_COMPLETE to be written after the upload" in log
    # The fallback: an upload that writes no marker counts once nothing changed for ingest.quiet_minutes.
    quiet, log = pending(s3_env, "ingest.quiet_minutes=0")
    assert [p["capture"] for p in quiet] == ["018"] and "no raw object changed for" in log

    upload_capture(store, tiny_capture)  # the rest, then the marker, last
    found, log = pending(s3_env)
    digest = raw_digest(s3_env)
    assert found == [{"capture": "018", "run_id": f"ingest__018__{digest[:12]}", "raw_digest": digest,
                      "reason": "no finished run"}]
    assert "capture 018 complete (completion marker s3://" in log


def _finish(store: ObjectStore) -> None:
    """A finished avatar of what is uploaded now: stages 1-2 for real (they record the raw digest), stages
    3-6 as quick stand-ins with the real stages' names and inputs (training takes minutes), run through
    the real stage contract so their manifests chain like a real run's."""
    from headavatar.contract.stage import Stage, run_stage
    from headavatar.stages import STAGE_NAMES, build_stage

    for name in STAGE_NAMES:
        real = build_stage(name)
        stage = real if name in ("extract", "sample") else type(f"StandIn_{name}", (Stage,), {
            "name": name, "inputs": real.inputs, "config_sections": (), "code_version": real.code_version,
            "run": lambda self, ctx: ctx.outputs.put_bytes("out.txt", ",".join(ctx.inputs.values()).encode()),
        })()
        run_stage(stage, "018", tiny_config(), store)


@pytest.mark.s3
def test_a_sequence_added_after_a_finished_run_is_pending_again(store: ObjectStore, tiny_capture: Path,
                                                                s3_env: dict[str, str], tmp_path: Path) -> None:
    upload_capture(store, _subset(tiny_capture, tmp_path / "first", "EXP-2-eyes"))
    first = raw_digest(s3_env)
    _finish(store)
    assert pending(s3_env)[0] == []  # finished from the raw inputs as they are: not pending

    time.sleep(1.1)  # LastModified has 1 s resolution: the late sequence is strictly newer than the marker
    late = tiny_capture / RAW / "sequence_EXP-2-eyes_part-1"
    store.upload_tree(late, store.key(RAW, late.name))
    found, log = pending(s3_env)
    assert found == [] and "objects changed after its completion marker" in log  # the late upload is under way

    mark_complete(store, "018", "v1")  # ... and now it is done
    found, _ = pending(s3_env)
    second = raw_digest(s3_env)
    assert second != first
    assert found == [{"capture": "018", "run_id": f"ingest__018__{second[:12]}", "raw_digest": second,
                      "reason": "raw inputs changed since its finished run"}]

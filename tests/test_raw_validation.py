"""Bad raw captures give a one-line error naming the problem and a non-zero exit."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import TINY, cli, upload_capture
from headavatar.layout import RAW
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, write_capture

pytestmark = pytest.mark.s3
CAM = "222200041"


@pytest.fixture(scope="module")
def small_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_capture(SyntheticSpec("200", frames=4, **TINY), root / RAW, workers=2)
    return root / RAW


def _variant(small: Path, tmp: Path, capture: str, mutate: Callable[[Path], None]) -> Path:
    """A copy of the small capture under another id, with one thing broken."""
    root = tmp / "v"
    for src in small.rglob("*"):
        if src.is_file():
            dst = root / RAW / Path(*[capture if p == "200" else p for p in src.relative_to(small).parts])
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    mutate(root / RAW)
    return root


def _video(raw: Path, capture: str, cam: str = CAM) -> Path:
    return raw / f"sequence_EXP-1-head_part-1/{capture}/EXP-1-head/cam_{cam}.mp4"


def _params(raw: Path, capture: str) -> Path:
    return raw / f"camera_params/{capture}/camera_params.json"


def _edit_params(capture: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(raw: Path) -> None:
        doc = json.loads(_params(raw, capture).read_text())
        edit(doc)
        _params(raw, capture).write_text(json.dumps(doc))
    return mutate


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "301": (lambda raw: _video(raw, "301").write_bytes(_video(raw, "301").read_bytes()[:2000]),
            rf"cam_{CAM}\.mp4: (unreadable or corrupt video|decoding stopped|video has zero frames)"),
    "302": (lambda raw: _video(raw, "302").write_bytes(b""), rf"cam_{CAM}\.mp4: zero-length video"),
    "303": (lambda raw: _video(raw, "303").write_bytes(b"not a video at all" * 100),
            rf"cam_{CAM}\.mp4: unreadable or corrupt video"),
    "304": (lambda raw: _params(raw, "304").unlink(), r"capture 304: missing s3://.*/camera_params\.json"),
    "305": (_edit_params("305", lambda d: d["world_2_cam"].pop(CAM)), rf"no world_2_cam for camera\(s\) {CAM}"),
    "306": (_edit_params("306", lambda d: d["world_2_cam"].__setitem__(CAM, [[0.0] * 4] * 4)),
            rf"world_2_cam\[{CAM}\] is not invertible"),
    "307": (_edit_params("307", lambda d: d.__setitem__("intrinsics", [[1, 0], [0, 1]])), r"intrinsics must be 3x3"),
    "308": (lambda raw: (raw / f"sequence_BACKGROUND_part-1/308/BACKGROUND/image_{CAM}.jpg").unlink(),
            rf"missing background plate s3://.*image_{CAM}\.jpg"),
    "309": (lambda raw: shutil.copy(_video(raw, "309"), _video(raw, "309", "999999999")),
            r"camera 999999999 is not in s3://.*camera_params\.json"),
    "310": (lambda raw: _params(raw, "310").write_text("{not json"), r"camera_params\.json: not valid JSON"),
}


@pytest.mark.parametrize("capture", sorted(CASES))
def test_bad_capture_fails_with_one_line(capture: str, small_capture: Path, tmp_path: Path, store: ObjectStore,
                                         s3_env: dict[str, str]) -> None:
    mutate, pattern = CASES[capture]
    upload_capture(store, _variant(small_capture, tmp_path, capture, mutate))
    r = cli("run", "extract", "--capture", capture, "--profile", "demo", env=s3_env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.stderr
    assert re.search(pattern, last), last
    assert not store.exists(store.key(f"avatars/{capture}/extract/manifest.json"))


def test_unknown_capture(s3_env: dict[str, str]) -> None:
    r = cli("validate", "--capture", "777", env=s3_env)
    assert r.returncode == 2 and "error: unknown capture '777'" in r.stderr
    assert "captures there: none; upload it first (docs/data.md) or check the id" in r.stderr


@pytest.mark.parametrize("bad", ["../018", "018;rm", "018/..", "", "x" * 200, "０１８"])
def test_bad_capture_id_on_the_command_line(bad: str, s3_env: dict[str, str]) -> None:
    r = cli("run", "extract", "--capture", bad, env=s3_env)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: invalid capture id") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_good_capture_validates(layout: str, small_capture: Path, tmp_path: Path, store: ObjectStore,
                                s3_env: dict[str, str]) -> None:
    if layout == "v1":
        upload_capture(store, _variant(small_capture, tmp_path, "200", lambda raw: None))
    else:
        write_capture(SyntheticSpec("200", frames=4, layout="v2", **TINY), tmp_path / RAW, workers=2)
        upload_capture(store, tmp_path)
    r = cli("validate", "--capture", "200", "--profile", "demo", env=s3_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sequences"] == ["EXP-1-head_part-1"] and out["layout"] == layout
    assert out["color_calibration"] is (layout == "v2")


VALIDATE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # a real video cut short (its index is at the end: the container no longer opens)
    "321": (lambda raw: _video(raw, "321").write_bytes(_video(raw, "321").read_bytes()[:-3000]),
            rf"s3://\S+/cam_{CAM}\.mp4: unreadable or corrupt video"),
    "322": (lambda raw: _video(raw, "322").write_bytes(np.random.default_rng(0).bytes(40_000)),
            rf"s3://\S+/cam_{CAM}\.mp4: unreadable or corrupt video"),
    "323": (lambda raw: (raw / f"sequence_BACKGROUND_part-1/323/BACKGROUND/image_{CAM}.jpg").write_text(
        "a text file, not a JPEG\n" * 50), rf"s3://\S+/image_{CAM}\.jpg: background plate is not a decodable image"),
}


@pytest.mark.parametrize("capture", sorted(VALIDATE_CASES))
def test_validate_opens_every_video_and_plate(capture: str, small_capture: Path, tmp_path: Path, store: ObjectStore,
                                              s3_env: dict[str, str]) -> None:
    mutate, pattern = VALIDATE_CASES[capture]
    upload_capture(store, _variant(small_capture, tmp_path, capture, mutate))
    before = {o.key for o in store.list(store.key())}
    r = cli("validate", "--capture", capture, "--profile", "demo", env=s3_env)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(f"error: {pattern}.*", errors[0]), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert {o.key for o in store.list(store.key())} == before  # nothing written


def _faststart(path: Path) -> None:
    """Remux with the index (moov) at the front, as many encoders write it: a cut file still opens."""
    src = av.open(str(path))
    out_path = path.with_suffix(".tmp.mp4")
    with av.open(str(out_path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.dts is not None:
                p.stream = stream
                out.mux(p)
    src.close()
    out_path.replace(path)


def test_validate_finds_a_cut_video_whose_index_is_at_the_front(small_capture: Path, tmp_path: Path,
                                                               store: ObjectStore, s3_env: dict[str, str]) -> None:
    def mutate(raw: Path) -> None:
        for v in raw.rglob("cam_*.mp4"):
            _faststart(v)
        data = _video(raw, "324").read_bytes()
        _video(raw, "324").write_bytes(data[:-1500])

    upload_capture(store, _variant(small_capture, tmp_path, "324", mutate))
    r = cli("validate", "--capture", "324", "--profile", "demo", env=s3_env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(rf"error: s3://\S+/cam_{CAM}\.mp4: truncated video", r.stderr), r.stderr
    ok = [line for line in r.stderr.splitlines() if line.startswith("error: ") and f"cam_{CAM}" not in line]
    assert ok == []  # the whole remuxed videos pass


def test_validate_reports_a_frame_count_that_disagrees(small_capture: Path, tmp_path: Path, store: ObjectStore,
                                                      s3_env: dict[str, str]) -> None:
    short = tmp_path / "short"
    write_capture(SyntheticSpec("200", frames=3, **TINY), short / RAW, workers=2)
    upload_capture(store, _variant(small_capture, tmp_path, "325", lambda raw: shutil.copy(
        _video(short / RAW, "200"), _video(raw, "325"))))
    r = cli("validate", "--capture", "325", "--profile", "demo", env=s3_env)
    assert r.returncode == 2
    assert re.search(rf"error: s3://\S+/cam_{CAM}\.mp4: h264, 3 frames, the other cameras of sequence "
                     r"EXP-1-head_part-1 have h264, 4 frames", r.stderr), r.stderr


def _cut_plate(raw: Path, capture: str) -> None:
    plate = raw / f"sequence_BACKGROUND_part-1/{capture}/BACKGROUND/image_{CAM}.jpg"
    plate.write_bytes(plate.read_bytes()[: plate.stat().st_size // 2])


def _cut_video(raw: Path, capture: str) -> None:
    _faststart(_video(raw, capture))  # index at the front: the cut file still opens
    _video(raw, capture).write_bytes(_video(raw, capture).read_bytes()[:-1500])


SHARED_PROBE_CASES: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "326": (_cut_plate, rf"s3://\S+/image_{CAM}\.jpg: background plate is not a decodable image"),
    "327": (_cut_video, rf"s3://\S+/cam_{CAM}\.mp4: truncated video"),
}


@pytest.mark.parametrize("capture", sorted(SHARED_PROBE_CASES))
def test_validate_and_stage_1_refuse_the_same_corrupt_media(capture: str, small_capture: Path, tmp_path: Path,
                                                             store: ObjectStore, s3_env: dict[str, str]) -> None:
    """One media probe for both (headavatar.raw_media): what validate refuses, stage 1 refuses with the same line."""
    mutate, pattern = SHARED_PROBE_CASES[capture]
    upload_capture(store, _variant(small_capture, tmp_path, capture, lambda raw: mutate(raw, capture)))
    lines = []
    for args in (("validate",), ("run", "extract")):
        r = cli(*args, "--capture", capture, "--profile", "demo", env=s3_env)
        assert r.returncode == 2, r.stdout + r.stderr
        errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.fullmatch(f"error: {pattern}.*", errors[0]), r.stderr
        assert "Traceback" not in r.stderr
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert not store.exists(store.key(f"avatars/{capture}/extract/manifest.json"))

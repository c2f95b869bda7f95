"""NeRSemble v2 participant folders (``nersemble-data download``) uploaded as is, beside v1 captures."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TINY, cli, upload_capture
from headavatar.layout import RAW
from headavatar.storage import ObjectStore
from headavatar.synthetic.capture import SyntheticSpec, write_capture

pytestmark = pytest.mark.s3
CAM = "222200041"
SEQUENCES = ("EXP-1-head", "EXP-6-tongue-1", "SEN-01-cramp_small_danger")


@pytest.fixture(scope="module")
def small_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A participant folder as downloaded, with a tongue sequence the default selection leaves out."""
    root = tmp_path_factory.mktemp("small_v2")
    write_capture(SyntheticSpec("400", frames=2, sequences=SEQUENCES, layout="v2", **TINY), root / RAW, workers=2)
    return root / RAW / "v2" / "400"


def _variant(small: Path, tmp: Path, capture: str, mutate: Callable[[Path], None]) -> Path:
    """A copy of the participant folder under another id with one thing changed; returns the upload root."""
    folder = tmp / "v" / RAW / "v2" / capture
    shutil.copytree(small, folder)
    mutate(folder)
    return tmp / "v"


def _edit_json(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        doc = json.loads((folder / rel).read_text())
        edit(doc)
        (folder / rel).write_text(json.dumps(doc))
    return mutate


PARAMS, COLOR = "calibration/camera_params.json", "calibration/color_calibration.json"
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # a calibration file without a camera that has videos (the camera is configured)
    "411": (_edit_json(PARAMS, lambda d: d["world_2_cam"].pop(CAM)),
            rf"v2/411/calibration/camera_params\.json: no world_2_cam for camera\(s\) {CAM}"),
    # ... and without one that is not configured but has videos
    "412": (lambda f: shutil.copy(f / f"sequences/EXP-1-head/images/cam_{CAM}.mp4",
                                  f / "sequences/EXP-1-head/images/cam_999999999.mp4"),
            r"v2/412/sequences/EXP-1-head/images/cam_999999999\.mp4: camera 999999999 is not in "
            r"s3://.*/v2/412/calibration/camera_params\.json"),
    "413": (_edit_json(COLOR, lambda d: d.pop(CAM)),
            rf"v2/413/calibration/color_calibration\.json: no colour-correction matrix for camera\(s\) {CAM}"),
    "414": (_edit_json(COLOR, lambda d: d.__setitem__(CAM, [[1, 0], [0, 1], [0, 0]])),
            rf"v2/414/calibration/color_calibration\.json: \[{CAM}\] must be 3xT with T in .* got shape \[3, 2\]"),
    "415": (_edit_json(COLOR, lambda d: d.__setitem__(CAM, [[1, 0, 0]])),
            rf"color_calibration\.json: \[{CAM}\] must be 3xT .* got shape \[1, 3\]"),
    "416": (lambda f: (f / f"sequences/SEN-01-cramp_small_danger/images/cam_{CAM}.mp4").unlink(),
            rf"sequence sequences/SEN-01-cramp_small_danger of capture 416 has no video for camera\(s\) {CAM}"),
    "417": (lambda f: (f / PARAMS).unlink(), r"capture 417 \(v2 layout\): missing s3://.*/v2/417/calibration/"),
    "418": (lambda f: (f / f"sequences/BACKGROUND/image_{CAM}.jpg").unlink(),
            rf"missing background plate s3://.*/v2/418/sequences/BACKGROUND/image_{CAM}\.jpg"),
    "419": (lambda f: (f / COLOR).write_text("[1, 2"), r"color_calibration\.json: not valid JSON"),
    # no colour calibration while extract.color_correction is on (the default)
    "422": (lambda f: (f / COLOR).unlink(),
            r"capture 422 \(v2 layout\): missing s3://.*/v2/422/calibration/color_calibration\.json \(.*"
            r"extract\.color_correction=false"),
    # videos of another size than the calibration's (intrinsics of NeRSemble's 2200x3208 frames; videos 256x372)
    "423": (_edit_json(PARAMS, lambda d: d.__setitem__("intrinsics", [[6600, 0, 1099.5], [0, 6600, 1603.5],
                                                                      [0, 0, 1]])),
            r"v2/423/sequences/EXP-1-head/images/cam_220700191\.mp4: frames are 256x372, but the intrinsics of "
            r"s3://.*/v2/423/calibration/camera_params\.json are for 2200x3208 frames"),
}


@pytest.mark.parametrize("capture", sorted(CASES))
def test_bad_v2_capture_fails_with_one_line(capture: str, small_v2: Path, tmp_path: Path, store: ObjectStore,
                                            s3_env: dict[str, str]) -> None:
    mutate, pattern = CASES[capture]
    upload_capture(store, _variant(small_v2, tmp_path, capture, mutate))
    for args in (("validate",), ("run", "extract")):
        r = cli(*args, "--capture", capture, "--profile", "demo", env=s3_env)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "Traceback" not in r.stderr
        assert re.search(pattern, last), last
    assert not store.exists(store.key(f"avatars/{capture}/extract/manifest.json"))


def test_v2_folder_validates_with_its_layout_and_selection(small_v2: Path, tmp_path: Path, store: ObjectStore,
                                                           s3_env: dict[str, str]) -> None:
    upload_capture(store, _variant(small_v2, tmp_path, "420", lambda f: None))
    r = cli("validate", "--capture", "420", "--profile", "demo", env=s3_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layout"] == "v2" and out["color_calibration"] is True
    assert out["sequences"] == ["EXP-1-head_part-1", "SEN-01-cramp_small_danger_part-1"]  # tongue excluded
    r = cli("validate", "--capture", "420", "--profile", "demo", "--set", "capture.include_sequences=[SEN-*]",
            env=s3_env)
    assert json.loads(r.stdout.strip().splitlines()[-1])["sequences"] == ["SEN-01-cramp_small_danger_part-1"]
    r = cli("validate", "--capture", "420", "--profile", "demo", "--set", "capture.exclude_sequences=[]", env=s3_env)
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["sequences"]) == 3
    r = cli("validate", "--capture", "420", "--profile", "demo", "--set", "capture.include_sequences=[GLASSES]",
            env=s3_env)
    assert r.returncode == 2 and "no usable sequence" in r.stderr and "include_sequences=['GLASSES']" in r.stderr


def test_v2_folder_without_colour_calibration_needs_correction_turned_off(
        small_v2: Path, tmp_path: Path, store: ObjectStore, s3_env: dict[str, str]) -> None:
    upload_capture(store, _variant(small_v2, tmp_path, "424", lambda f: (f / COLOR).unlink()))
    r = cli("validate", "--capture", "424", "--profile", "demo", "--set", "extract.color_correction=false",
            env=s3_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["color_calibration"] is False


def test_partial_camera_download_names_the_setting(small_v2: Path, tmp_path: Path, store: ObjectStore,
                                                   s3_env: dict[str, str]) -> None:
    """A download of 4 cameras: the error says which are there; selecting them makes the capture usable."""
    keep = ("222200036", "222200037", "222200040", CAM)

    def only_four(f: Path) -> None:
        for p in f.rglob("*"):
            m = re.search(r"_(\d{9})\.(mp4|jpg)$", p.name)
            if m and m.group(1) not in keep:
                p.unlink()
    upload_capture(store, _variant(small_v2, tmp_path, "421", only_four))
    r = cli("validate", "--capture", "421", "--profile", "demo", env=s3_env)
    assert r.returncode == 2
    assert f"cameras present: {', '.join(keep)}; set capture.cameras" in r.stderr.strip().splitlines()[-1]
    r = cli("validate", "--capture", "421", "--profile", "demo", "--set", f"capture.cameras=[{','.join(keep)}]",
            env=s3_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["cameras"] == 4


def test_both_layouts_for_one_id_is_an_error(small_v2: Path, tiny_capture: Path, tmp_path: Path, store: ObjectStore,
                                             s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)  # v1 capture 018
    upload_capture(store, _variant(small_v2, tmp_path, "018", lambda f: None))
    r = cli("validate", "--capture", "018", "--profile", "demo", env=s3_env)
    assert r.returncode == 2 and "capture 018 is in both raw layouts" in r.stderr


def test_ingestion_reports_v1_and_v2_captures(small_v2: Path, tiny_capture: Path, tmp_path: Path,
                                              store: ObjectStore, s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    upload_capture(store, _variant(small_v2, tmp_path / "a", "430", lambda f: None))
    # 431: an upload still under way (a colour calibration without one camera yet)
    upload_capture(store, _variant(small_v2, tmp_path / "b", "431", _edit_json(COLOR, lambda d: d.pop(CAM))))
    r = cli("captures", "--profile", "demo", env=s3_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["018", "430"]
    assert "capture 431 not complete yet" in r.stderr and "no colour-correction matrix" in r.stderr


# The download CLI's arguments as read in nersemble-data 0.0.6 (nersemble_data/scripts/manage_data.py, a tyro
# command): one positional PATH; --participant, --sequence and --camera each take ONE string, split on commas.
DOWNLOAD_SINGLE_VALUE = ("--participant", "--sequence", "--camera", "--n-workers")


def test_documented_download_command_uses_comma_separated_lists() -> None:
    import shlex

    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    commands = [line for line in docs.splitlines() if line.startswith("nersemble-data download ")]
    assert commands
    for line in commands:
        args = shlex.split(line.split("#")[0])[2:]
        positional, i = [], 0
        while i < len(args):
            if args[i] in DOWNLOAD_SINGLE_VALUE:
                i += 2
            else:
                assert not args[i].startswith("-"), f"unknown option {args[i]} in: {line}"
                positional.append(args[i])
                i += 1
        assert len(positional) == 1, f"one PATH, lists comma-separated: {line}"

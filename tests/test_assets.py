"""``headavatar assets``: model files checked against their pins before they enter the bucket."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli
from headavatar.assets import CATALOG, AssetSpec, asset_key, asset_state, get_asset, put_asset
from headavatar.errors import ConfigError
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def http_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server (python -m http.server) on 127.0.0.1 serving a folder; stopped by its PID."""
    root = tmp_path_factory.mktemp("served")
    (root / "weights.pth").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url, root
    finally:
        proc.terminate()
        proc.wait(10)


def _spec(size: int | None, sha: str | None) -> AssetSpec:
    return AssetSpec("test", "test_weights.pth", "test file", None, size, sha)


def test_fetched_file_matching_its_pins_is_uploaded_and_verified(http_files: tuple[str, Path], store: ObjectStore,
                                                                 tmp_path: Path) -> None:
    url, root = http_files
    data = (root / "weights.pth").read_bytes()
    spec = _spec(len(data), hashlib.sha256(data).hexdigest())
    assert asset_state(store, spec)["present"] is False
    out = put_asset(store, spec, f"{url}/weights.pth?token=secret", tmp_path)
    assert out["sha256"] == spec.sha256 and out["checked_against_pins"] is True
    assert store.get_bytes(asset_key(store, spec)) == data
    state = asset_state(store, spec)
    assert state["present"] and state["verified"]
    record = store.get_bytes(asset_key(store, spec) + ".verified.json").decode()
    assert "secret" not in record  # a signed URL's query string is never stored
    got = get_asset(store, spec, tmp_path / "hub")
    assert got.read_bytes() == data


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_mismatch_is_refused_with_one_line_and_nothing_uploaded(wrong: str, http_files: tuple[str, Path],
                                                                store: ObjectStore, tmp_path: Path) -> None:
    url, root = http_files
    data = (root / "weights.pth").read_bytes()
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    spec = _spec(size - 1 if wrong == "size" else size, ("0" * 64) if wrong == "sha256" else sha)
    with pytest.raises(ConfigError) as e:
        put_asset(store, spec, f"{url}/weights.pth", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("(refused; nothing uploaded)"), msg
    assert ("larger than the pinned 1,048,575 bytes" if wrong == "size" else f"sha256 {sha}, expected 000") in msg
    assert not store.exists(asset_key(store, spec))


def test_cli_refuses_a_file_that_is_not_the_reference_weights(http_files: tuple[str, Path], store: ObjectStore,
                                                              s3_env: dict[str, str]) -> None:
    url, _ = http_files
    r = cli("assets", "put", "bmv2", f"{url}/weights.pth", env=s3_env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: assets put bmv2: {url}/weights.pth is not the reference pytorch_resnet101.pth: 1,048,576 bytes, "
        "expected 237,643,033; sha256 " + hashlib.sha256(bytes(range(256)) * 4096).hexdigest()
        + ", expected 006dd158a7acedb75685d688474b00796bba3d6907dfbed2d48b7a081743c77f (refused; nothing uploaded)")
    assert not store.exists(asset_key(store, CATALOG["bmv2"]))
    r = cli("assets", "put", "bmv2", "/nonexistent/pytorch_resnet101.pth", env=s3_env)
    assert r.returncode == 2 and "is not a file" in r.stderr


def test_list_and_validate_say_what_the_configured_run_lacks(small_capture_any: None, store: ObjectStore,
                                                             s3_env: dict[str, str]) -> None:
    r = cli("assets", "list", env=s3_env)
    assert r.returncode == 0, r.stderr
    rows = {row["asset"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])}
    assert set(rows) == set(CATALOG)
    assert rows["bmv2"]["present"] is False and rows["bmv2"]["needed"] is True
    assert rows["bmv2"]["pinned"] and rows["bfm09"]["pinned"]

    r = cli("validate", "--capture", "500", env=s3_env)  # default config: the real-run models
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["assets_lacking"]) == {"bmv2", "bfm09", "dlib68", "lpips"}
    assert "warning: the configured run lacks asset bmv2: matting.weights is not set; headavatar assets put bmv2" \
        in r.stderr
    r = cli("validate", "--capture", "500", "--profile", "demo", env=s3_env)  # synthetic models, no weights
    assert json.loads(r.stdout.strip().splitlines()[-1])["assets_lacking"] == ["lpips"]


@pytest.fixture
def small_capture_any(store: ObjectStore, tmp_path: Path) -> None:
    """Capture 500 in the bucket (v2, 1 frame): ``validate`` needs a valid capture to get to the assets."""
    from conftest import TINY, upload_capture
    from headavatar.layout import RAW
    from headavatar.synthetic.capture import SyntheticSpec, write_capture

    write_capture(SyntheticSpec("500", frames=1, layout="v2", **TINY), tmp_path / RAW, workers=2)
    upload_capture(store, tmp_path)

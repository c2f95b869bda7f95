"""Least privilege: a stage's S3 identity limited to its prefixes is enough, and nothing more works.

SeaweedFS enforces per-identity actions on key patterns (``Read:bucket/prefix/*``); README
"Security" gives the same grants as an S3 bucket policy for every stage.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.devserver.seaweed import EmbeddedS3, Identity
from headavatar.settings import load_config
from headavatar.storage import ObjectStore

BUCKET, PREFIX = "security", "lp"
REPO = Path(__file__).resolve().parents[1]
EXTRACT_ONLY = Identity("stage-extract", [f"List:{BUCKET}", f"Read:{BUCKET}/{PREFIX}/raw/*",
                                          f"Read:{BUCKET}/{PREFIX}/avatars/018/extract/*",
                                          f"Write:{BUCKET}/{PREFIX}/avatars/018/extract/*"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    s3 = EmbeddedS3(tmp_path_factory.mktemp("security-s3"),
                    identities=[Identity("admin", ["Admin"]), EXTRACT_ONLY]).start()
    s3.create_bucket(BUCKET)
    try:
        yield s3
    finally:
        s3.stop()


@pytest.mark.s3
@pytest.mark.slow
def test_a_stage_needs_only_its_own_prefixes(server: EmbeddedS3, tiny_capture: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": PREFIX}
    admin_env = {**server.env(), **base}
    for k, v in admin_env.items():
        monkeypatch.setenv(k, v)
    admin = ObjectStore(load_config().storage)
    upload_capture(admin, tiny_capture)

    env = {**server.env(EXTRACT_ONLY), **base}
    r = cli("run", "extract", "--capture", "018", "--profile", "demo", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(admin, "018", "extract") is not None

    # The same identity may not write another stage's outputs, nor touch the raw capture.
    r = cli("run", "sample", "--capture", "018", "--profile", "demo", env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: access denied to") and "/avatars/018/sample/" in last, last
    assert read_manifest(admin, "018", "sample") is None
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    limited = ObjectStore(load_config().storage)
    with pytest.raises(Exception, match="access denied to write"):
        limited.put_bytes(limited.key("raw", "camera_params", "018", "camera_params.json"), b"{}")


def test_no_credentials_in_the_repository() -> None:
    """Keys look like AKIA.../ASIA... (AWS) or are assigned to secret-named settings: none is committed."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assigned = re.compile(r"(?i)(secret_access_key|password|secret_key)\s*[:=]\s*['\"]?([A-Za-z0-9/+]{16,})")
    found = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in (".png", ".jpg", ".npz", ".pt", ".mp4", ".whl"):
            continue
        text = path.read_text(errors="ignore")
        found += [f"{name}: {m.group(0)[:20]}" for m in key_id.finditer(text)]
        found += [f"{name}: {m.group(0)[:40]}" for m in assigned.finditer(text) if "change-me" not in m.group(2)]
    assert not found, found

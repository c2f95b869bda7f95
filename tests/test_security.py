"""Least privilege: a stage's S3 identity limited to its prefixes is enough, and nothing more works.

SeaweedFS enforces per-identity actions on key patterns (``Read:bucket/prefix/*``); README
"Security" gives the same grants as an S3 bucket policy for every stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _entrypoint() -> Any:
    """images/compose/seaweedfs-entrypoint.py, which translates the compose stack's IAM policies."""
    spec = importlib.util.spec_from_file_location("seaweedfs_entrypoint",
                                                  REPO / "images" / "compose" / "seaweedfs-entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.s3
def test_s3_init_passes_the_policies_as_enforced_and_stops_on_any_difference(tmp_path: Path) -> None:
    """infra/compose/s3-init.py against a SeaweedFS given the compose stack's identities (translated by the
    image's entrypoint): exit 0. Against policies the store does not enforce (the stages' write right taken
    out of the file s3-init reads, not out of the store): exit 2, naming identity, action and key."""
    policies = REPO / "infra" / "policies"
    translate = _entrypoint().policy_actions
    identities = [Identity("admin", ["Admin"])]
    for p in sorted(policies.glob("*.json")):
        identities.append(Identity(p.stem, translate(json.loads(p.read_text()), "headavatar", p)))
    s3 = EmbeddedS3(tmp_path / "s3", identities=identities).start()
    try:
        env = {"PATH": os.environ["PATH"], "S3_ENDPOINT": s3.endpoint_url, "BUCKET": "headavatar",
               "S3_ADMIN_USER": s3.admin.access_key, "S3_ADMIN_PASSWORD": s3.admin.secret_key,
               **{k: v for i in identities[1:] for k, v in ((f"S3_{i.name.upper()}_ACCESS_KEY", i.access_key),
                                                             (f"S3_{i.name.upper()}_SECRET_KEY", i.secret_key))}}
        init = [sys.executable, str(REPO / "infra" / "compose" / "s3-init.py")]
        r = subprocess.run(init, env={**env, "S3_POLICIES": str(policies)}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "ingest, mlflow, readonly, stages limited to their policies" in r.stdout
        stricter = tmp_path / "policies"
        shutil.copytree(policies, stricter)
        stages = json.loads((stricter / "stages.json").read_text())
        for statement in stages["Statement"]:
            statement["Action"] = [a for a in statement["Action"] if a != "s3:PutObject"]
        (stricter / "stages.json").write_text(json.dumps(stages))
        r = subprocess.run(init, env={**env, "S3_POLICIES": str(stricter)}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
        assert ("stages may s3:PutObject headavatar/nersemble/avatars/.s3-init-probe, its policy says no"
                in r.stderr.strip().splitlines()[-1]), r.stderr[-2000:]
    finally:
        s3.stop()

"""A stage SIGKILLed half-way leaves no manifest; the retry completes with identical outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, upload_capture
from headavatar.contract.stage import read_manifest
from headavatar.layout import MANIFEST, stage_prefix
from headavatar.storage import ObjectStore, sha256_bytes

pytestmark = pytest.mark.s3


@pytest.mark.slow
def test_sigkill_mid_extract_then_retry(store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str],
                                        tmp_path: Path) -> None:
    upload_capture(store, tiny_capture)
    env = {**s3_env, "HEADAVATAR_SCRATCH": str(tmp_path)}
    assert cli("run", "extract", "--capture", "018", "--profile", "demo", env=env).returncode == 0
    undisturbed = read_manifest(store, "018", "extract")
    prefix = store.key(stage_prefix("018", "extract"))
    # Nothing of the first run may stand in for the killed run's or the retry's work.
    assert store.delete_many([o.key for o in store.list(prefix)]) > len(undisturbed.files)
    frames = [rel for rel in undisturbed.files if rel.startswith("images/")]

    proc = subprocess.Popen(
        [sys.executable, "-m", "headavatar.cli", "run", "extract", "--capture", "018", "--profile", "demo", "--force"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    # Wait until the forced run is uploading frames: some are there, not all of them.
    while time.monotonic() < deadline and proc.poll() is None:
        if any("images/" in o.key for o in store.list(prefix)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "stage finished before it could be killed"
    written = [o.key for o in store.list(prefix) if "/images/" in o.key]
    assert 0 < len(written) < len(frames), (len(written), len(frames))

    assert read_manifest(store, "018", "extract") is None
    status = cli("status", "--capture", "018", env=env)
    assert "extract       missing" in status.stdout
    retry = cli("run", "extract", "--capture", "018", "--profile", "demo", env=env)
    assert retry.returncode == 0, retry.stderr
    after = read_manifest(store, "018", "extract")
    assert after.content_digest == undisturbed.content_digest
    assert after.files == undisturbed.files
    # The objects themselves, not only the manifest's record of them, are the undisturbed run's bytes.
    stored = {o.key[len(prefix) + 1:]: o.key for o in store.list(prefix) if "/_state/" not in o.key}
    assert sorted(stored) == sorted([*after.files, MANIFEST])
    for rel, entry in after.files.items():
        assert sha256_bytes(store.get_bytes(stored[rel])) == entry.sha256, rel
    # The killed run's scratch directory was removed by the retry.
    assert list(tmp_path.iterdir()) == []

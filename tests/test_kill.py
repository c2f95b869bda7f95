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
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3


def test_sigkill_mid_extract_then_retry(store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str],
                                        tmp_path: Path) -> None:
    upload_capture(store, tiny_capture)
    env = {**s3_env, "HEADAVATAR_SCRATCH": str(tmp_path)}
    assert cli("run", "extract", "--capture", "018", "--profile", "demo", env=env).returncode == 0
    undisturbed = read_manifest(store, "018", "extract")

    proc = subprocess.Popen(
        [sys.executable, "-m", "headavatar.cli", "run", "extract", "--capture", "018", "--profile", "demo", "--force"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    prefix = store.key(stage_prefix("018", "extract"))
    deadline = time.monotonic() + 120
    # Wait until the forced run has dropped the old manifest and is uploading new frames.
    while time.monotonic() < deadline and proc.poll() is None:
        if read_manifest(store, "018", "extract") is None and any("images/" in o.key for o in store.list(prefix)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "stage finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    assert read_manifest(store, "018", "extract") is None
    status = cli("status", "--capture", "018", env=env)
    assert "extract       missing" in status.stdout
    retry = cli("run", "extract", "--capture", "018", "--profile", "demo", env=env)
    assert retry.returncode == 0, retry.stderr
    after = read_manifest(store, "018", "extract")
    assert after.content_digest == undisturbed.content_digest
    assert after.files == undisturbed.files
    # The killed run's scratch directory was removed by the retry.
    assert list(tmp_path.iterdir()) == []

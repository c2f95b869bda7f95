"""Shared fixtures: a real SeaweedFS S3 server for the session, tiny synthetic captures."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from headavatar.devserver.captures import (  # noqa: F401 (the tests' helpers)
    TINY,
    output_digests,
    upload_capture,
    write_tiny_capture,
)
from headavatar.devserver.seaweed import EmbeddedS3, Identity
from headavatar.layout import GROUND_TRUTH, RAW
from headavatar.settings import PipelineConfig, load_config
from headavatar.storage import ObjectStore

BUCKET = "headavatar-test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the Docker images run last: in CI the images build in the background meanwhile."""
    items.sort(key=lambda item: 2 if item.get_closest_marker("compose") else 1 if item.get_closest_marker("docker")
               else 0)


CHROMIUM = os.environ.get("HEADAVATAR_CHROMIUM", "/usr/bin/chromium")
# Offline and quiet: no sandbox (root in CI containers), no GPU, nothing fetched from the internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

@pytest.fixture(scope="session")
def compose_outputs() -> dict[str, dict[str, dict[str, str]]]:
    """{conf as JSON: {stage: output digests}} of the compose stack's one-host DAG runs (LocalExecutor) made so
    far this session, for the multi-host test to compare its runs with (it makes its own when absent)."""
    return {}


@pytest.fixture(scope="session")
def local_dag_runs() -> dict[str, str]:
    """{conf as JSON: key prefix} of the local-backend DAG runs of tiny capture 018 made so far this
    session, so that a test comparing another backend with the local one reuses a finished run."""
    return {}


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    server = EmbeddedS3(
        tmp_path_factory.mktemp("seaweedfs"),
        identities=[Identity("admin", ["Admin"]),
                    Identity("reader", [f"Read:{BUCKET}", f"List:{BUCKET}"])],
    )
    server.start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3: EmbeddedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite store, artifacts proxied into the test bucket); yields its URI."""
    from headavatar.devserver.mlflow_server import EmbeddedMLflow

    server = EmbeddedMLflow(tmp_path_factory.mktemp("mlflow"), s3.env(), BUCKET)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a stage process: endpoint + admin credentials, a prefix unique to the test."""
    env = {**s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": f"t-{secrets.token_hex(4)}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def full_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs for HEADAVATAR_SCRATCH: what a stage writes there soon fills it (mounting needs root, as
    on CI)."""
    scratch = tmp_path / "tiny-scratch"
    scratch.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(scratch)],
                      capture_output=True).returncode != 0:
        pytest.fail("cannot mount a tmpfs for the disk-full fault (needs root, as on CI)")
    try:
        yield scratch
    finally:
        subprocess.run(["umount", str(scratch)], check=True)


def tiny_config(*overrides: str) -> PipelineConfig:
    """The demo profile (crop scaled to 256x372 videos), reading storage from the environment."""
    return load_config("demo", list(overrides))


def fake_manifest(store: ObjectStore, stage: str, files: dict[str, bytes], capture: str = "018") -> None:
    """An upstream stage 'done' with ``files`` (uploaded): what a later stage reads its inputs through."""
    from headavatar.contract.manifest import FileEntry, Manifest
    from headavatar.contract.stage import manifest_key
    from headavatar.layout import stage_prefix

    prefix = store.key(stage_prefix(capture, stage))
    entries = {}
    for rel, data in files.items():
        store.put_bytes(f"{prefix}/{rel}", data)
        entries[rel] = FileEntry(len(data), "0" * 64)
    m = Manifest(stage=stage, capture=capture, package_version="0", config_digest="d", config={}, inputs={},
                 files=entries)
    store.put_bytes(manifest_key(store, capture, stage), m.to_json())


@pytest.fixture
def store(s3_env: dict[str, str]) -> Iterator[ObjectStore]:
    st = ObjectStore(tiny_config().storage)
    yield st
    st.close()


def zip_capture(raw: Path, capture: str, out: Path) -> dict[str, str]:
    """The local raw layout of capture 018 as .zip archives for ``capture``, in the two shapes
    deliveries come in: entries under a top folder named like the archive, or not.
    Returns {raw-relative key: sha256} of every file the archives hold."""
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for top in sorted(p for p in raw.iterdir() if p.is_dir()):
        nested = top.name == "sequence_BACKGROUND_part-1"  # this one carries its own top folder
        with zipfile.ZipFile(out / f"{top.name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(top.rglob("*")):
                if f.is_file():
                    rel = f.relative_to(top).as_posix().replace("018", capture)
                    zf.write(f, f"{top.name}/{rel}" if nested else rel)
                    expected[f"{top.name}/{rel}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return expected


# Stages 1-4 of tiny capture 018 on the demo profile, then stage 5 with this setting: what the stage-5 and
# stage-6 tests start from (``demo_upstream``); a stage-6 run on it passes the same setting.
UPSTREAM_MESHHEAD = "meshhead.steps=60"


@pytest.fixture(scope="session")
def demo_upstream(s3: EmbeddedS3, tiny_capture: Path) -> str:
    """A key prefix where tiny capture 018 went through stages 1-4 on the demo profile and stage 5 with
    ``UPSTREAM_MESHHEAD``, computed once a session; tests take what they start from with
    :func:`copy_stages` instead of computing it again each."""
    from headavatar.contract.stage import run_stage
    from headavatar.stages import build_stages

    prefix = f"demo-upstream-{secrets.token_hex(4)}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3.env(), "HEADAVATAR_S3_BUCKET": BUCKET, "HEADAVATAR_S3_PREFIX": prefix}.items():
            mp.setenv(k, v)
        store = ObjectStore(tiny_config().storage)
        try:
            upload_capture(store, tiny_capture)
            stages = build_stages()
            for name in ("extract", "sample", "matting", "fitting"):
                run_stage(stages[name], "018", tiny_config(), store)
            run_stage(stages["meshhead"], "018", tiny_config(UPSTREAM_MESHHEAD), store)
        finally:
            store.close()
    return prefix


def copy_stages(store: ObjectStore, source_prefix: str, stages: tuple[str, ...], capture: str = "018") -> None:
    """Server-side copies into ``store``'s prefix of a capture's raw files, its ground truth and ``stages``'
    outputs (not their ``_state/``) under ``source_prefix``: those stages are done there as they were at
    the source, manifests, content digests and cache keys alike (no key holds the prefix)."""
    from concurrent.futures import ThreadPoolExecutor

    from headavatar.layout import stage_prefix

    objects = [obj for folder in (RAW, GROUND_TRUTH, *(stage_prefix(capture, s) for s in stages))
               for obj in store.list(f"{source_prefix}/{folder}") if "/_state/" not in obj.key]
    with ThreadPoolExecutor(store.cfg.max_concurrency) as pool:  # thousands of small objects, a request each
        list(pool.map(lambda o: store.copy(o.key, store.key(o.key.removeprefix(f"{source_prefix}/")), o.size),
                      objects))


def prepare_sampled(store: ObjectStore, root: Path, *overrides: str) -> None:
    """Upload a capture and run stages 1-2 on it: what stages 3-6 start from."""
    from headavatar.contract.stage import run_stage
    from headavatar.stages import build_stages

    upload_capture(store, root)
    stages = build_stages()
    for name in ("extract", "sample"):
        run_stage(stages[name], "018", tiny_config(*overrides), store)


@pytest.fixture(scope="session")
def tiny_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 cameras, 2 sequences of 20 frames at 256x372 (local raw layout + ground truth)."""
    return write_tiny_capture(tmp_path_factory.mktemp("capture018"))


@pytest.fixture(scope="session")
def tiny_capture_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_capture`` in the NeRSemble v2 layout (raw/v2/018/), recorded through a colour calibration."""
    return write_tiny_capture(tmp_path_factory.mktemp("capture018v2"), layout="v2")


def assert_gradients_match_finite_differences(loss, inputs: list, eps: float = 1e-6, tol: float = 1e-5) -> None:
    """Autograd gradients of ``loss(*inputs)`` (float64 tensors) against central differences."""
    import torch

    args = [t.detach().clone().requires_grad_() for t in inputs]
    loss(*args).backward()
    for i, arg in enumerate(args):
        numeric = torch.zeros_like(arg)
        for j in range(arg.numel()):
            step = torch.zeros_like(arg).view(-1)
            step[j] = eps
            plus = [a.detach() + (step.view_as(a) if k == i else 0) for k, a in enumerate(args)]
            minus = [a.detach() - (step.view_as(a) if k == i else 0) for k, a in enumerate(args)]
            numeric.view(-1)[j] = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert arg.grad.abs().max() > 1e-3, f"input {i} gets no gradient"
        torch.testing.assert_close(arg.grad, numeric, atol=tol, rtol=tol, msg=f"input {i}")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a container would."""
    return subprocess.run(
        [sys.executable, "-m", "headavatar.cli", *args],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )

"""Code version in the cache key, volatile outputs out of the content digest, stale stages in `status`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import cli, prepare_sampled, tiny_config
from headavatar.contract.manifest import Manifest, digest
from headavatar.contract.stage import Stage, StageContext, manifest_key, read_manifest, run_stage
from headavatar.contract.status import capture_status
from headavatar.stages import STAGE_NAMES, build_stage
from headavatar.storage import ObjectStore

pytestmark = pytest.mark.s3


class Model(Stage):
    """A 'training' stage: a deterministic model plus run-dependent telemetry."""

    name = "extract"
    inputs = ()
    config_sections = ("sample",)
    code_version = 1
    volatile_outputs = ("history.json", "checkpoints/*")
    runs = 0
    keys: ClassVar[list[str]] = []

    def run(self, ctx: StageContext) -> None:
        Model.runs += 1
        Model.keys.append(ctx.cache_key)  # what training checkpoints are tagged with
        ctx.outputs.put_bytes("model.bin", f"weights for stride {ctx.config.sample.frame_stride}".encode())
        ctx.outputs.put_bytes("history.json", json.dumps({"cpu": time.time_ns()}).encode())
        ctx.outputs.put_bytes("checkpoints/step-1.pt", str(time.time_ns()).encode())


class Render(Stage):
    name = "sample"
    inputs = ("extract",)
    config_sections = ()
    code_version = 1
    runs = 0

    def run(self, ctx: StageContext) -> None:
        Render.runs += 1
        ctx.outputs.put_bytes("render.txt", ctx.store.get_bytes(ctx.input_key("extract", "model.bin")))


def test_a_code_version_bump_recomputes_that_stage_only(store: ObjectStore) -> None:
    cfg = tiny_config()
    Model.runs = Render.runs = 0
    run_stage(Model(), "018", cfg, store)
    run_stage(Render(), "018", cfg, store)
    assert run_stage(Model(), "018", cfg, store).cached and Model.runs == 1

    class Fixed(Model):
        code_version = 2  # a bug fix that changes the stage's outputs

    res = run_stage(Fixed(), "018", cfg, store)
    assert not res.cached and Model.runs == 2 and res.manifest.code_version == 2
    assert Model.keys[-1] != Model.keys[-2]  # a checkpoint of the old code is not resumed from
    assert read_manifest(store, "018", "extract").code_version == 2
    assert run_stage(Fixed(), "018", cfg, store).cached
    # Same model bytes, new telemetry: the content digest, and so the downstream cache, holds.
    assert run_stage(Render(), "018", cfg, store).cached and Render.runs == 1
    # Going back to the old code is a change too: what that code made comes back (a kept variant), uncomputed.
    back = run_stage(Model(), "018", cfg, store)
    assert back.cached and Model.runs == 2 and back.manifest.code_version == 1


def test_volatile_outputs_are_listed_but_do_not_invalidate_downstream(store: ObjectStore) -> None:
    cfg = tiny_config()
    Render.runs = 0
    first = run_stage(Model(), "018", cfg, store).manifest
    run_stage(Render(), "018", cfg, store)
    again = run_stage(Model(), "018", cfg, store, force=True).manifest
    assert again.volatile == ["checkpoints/step-1.pt", "history.json"]
    assert again.files["history.json"].sha256 != first.files["history.json"].sha256  # listed with its digest
    assert again.files["model.bin"] == first.files["model.bin"]
    assert again.content_digest == first.content_digest
    assert run_stage(Render(), "018", cfg, store).cached and Render.runs == 1
    # A changed model byte still invalidates downstream.
    run_stage(Model(), "018", tiny_config("sample.frame_stride=3"), store)
    assert not run_stage(Render(), "018", cfg, store).cached and Render.runs == 2
    doc = json.loads(store.get_bytes(manifest_key(store, "018", "extract")))
    assert doc["code_version"] == 1 and doc["volatile"] == ["checkpoints/step-1.pt", "history.json"]


def test_manifests_from_before_code_versions_load_as_version_1_with_their_old_digest() -> None:
    old = {"stage": "sample", "capture": "018", "package_version": "0.1.0", "config_digest": "c", "config": {},
           "inputs": {"extract": "e"}, "files": {"a.jpg": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}},
           "metrics": {}, "started_at": "", "finished_at": "", "wall_time_s": 1.0, "schema": 1}
    m = Manifest.from_json(json.dumps(old).encode())
    assert m.code_version == 1 and m.volatile == []
    # Digest as written before volatile outputs existed: downstream caches of old captures stay valid.
    assert m.content_digest == digest({"stage": "sample", "files": {k: asdict(v) for k, v in m.files.items()}})
    assert m.matches({"extract": "e"}, "c", 1) and not m.matches({"extract": "e"}, "c", 2)


def test_status_names_stale_stages_and_why(store: ObjectStore) -> None:
    cfg = tiny_config()
    run_stage(Model(), "018", cfg, store)
    run_stage(Render(), "018", cfg, store)
    st = {s.stage: s for s in capture_status({"extract": Model(), "sample": Render()}, "018", cfg, store)}
    assert (st["extract"].state, st["sample"].state) == ("done", "done")

    class Fixed(Model):
        code_version = 2

    st = {s.stage: s for s in capture_status({"extract": Fixed(), "sample": Render()}, "018", cfg, store)}
    assert st["extract"].state == "stale" and st["extract"].reasons == ["code version 1, now 2"]
    assert st["sample"].state == "done" and st["sample"].after == ["extract"]
    assert "after extract (not done now)" in st["sample"].line()

    changed = tiny_config("sample.frame_stride=7")
    st = {s.stage: s for s in capture_status({"extract": Model(), "sample": Render()}, "018", changed, store)}
    assert st["extract"].state == "stale" and st["extract"].reasons == ["config sample.frame_stride"]
    run_stage(Model(), "018", changed, store)  # different model bytes: the downstream input changed
    st = {s.stage: s for s in capture_status({"extract": Model(), "sample": Render()}, "018", changed, store)}
    assert st["extract"].state == "done"
    assert st["sample"].state == "stale" and st["sample"].reasons == ["inputs extract"]


@pytest.mark.slow
def test_status_command_on_real_stages(store: ObjectStore, tiny_capture: Path, s3_env: dict[str, str]) -> None:
    prepare_sampled(store, tiny_capture)
    demo = ["--capture", "018", "--profile", "demo"]
    r = cli("status", *demo, env=s3_env)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert list(lines) == list(STAGE_NAMES)
    extract_version = build_stage("extract").code_version
    assert lines["extract"].startswith("done ") and f"code v{extract_version}" in lines["extract"]
    assert lines["sample"].startswith("done ") and lines["matting"] == "missing"

    # A manifest made by another code version (as after a bump): stale, and the next run recomputes it.
    key = manifest_key(store, "018", "sample")
    doc = json.loads(store.get_bytes(key))
    doc["code_version"] = 0
    store.put_bytes(key, json.dumps(doc).encode())
    lines = dict(line.split(None, 1) for line in cli("status", *demo, env=s3_env).stdout.splitlines())
    sample_version = build_stage("sample").code_version
    assert lines["sample"].startswith(f"stale: code version 0, now {sample_version}"), lines["sample"]
    assert lines["extract"].startswith("done ")
    lines = dict(line.split(None, 1) for line in cli("status", *demo, "--set", "sample.frame_stride=6",
                                                     env=s3_env).stdout.splitlines())
    assert lines["extract"].startswith("stale: config sample.frame_stride"), lines["extract"]
    rerun = cli("run", "sample", *demo, env=s3_env)
    assert rerun.returncode == 0 and '"cached": false' in rerun.stdout, rerun.stderr[-2000:]
    assert f"stale (code version 0, now {sample_version}); recomputing" in rerun.stderr
    lines = dict(line.split(None, 1) for line in cli("status", *demo, env=s3_env).stdout.splitlines())
    assert lines["sample"].startswith("done "), lines["sample"]

"""Cache keys of result settings only: execution settings, later settings and old manifests (issue 34.1)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import cli, tiny_config, upload_capture
from headavatar.contract.config_key import config_key, is_execution, result_config
from headavatar.contract.manifest import digest
from headavatar.contract.stage import (
    Stage,
    StageContext,
    expected,
    manifest_key,
    read_manifest,
    run_stage,
    stale_reasons,
)
from headavatar.layout import stage_prefix
from headavatar.settings import GaussianHeadConfig, PipelineConfig, added_later, execution
from headavatar.storage import ObjectStore
from headavatar.training.checkpoints import Checkpoints

ROOT = Path(__file__).resolve().parents[1]
EXECUTION_CHANGES = {
    "extract": {"workers": 3, "prefetch_videos": 0},
    "matting": {"device": "cpu", "precision": "fp32", "batch_size": 2},
    "landmarks": {"device": "cuda:1"},
    "fitting": {"device": "cpu"},
    "meshhead": {"device": "cuda", "compile": False, "precision": "fp32", "rasterizer": "pytorch3d",
                 "eval_every": 7, "checkpoint_every": 3, "keep_checkpoint_every": 0},
    "gaussianhead": {"device": "cuda:0", "compile": False, "precision": "fp32", "rasterizer": "torch",
                     "eval_every": 7, "checkpoint_every": 3, "keep_checkpoint_every": 0, "ranks": 2},
}
RESULT_CHANGES = {"extract": {"jpeg_quality": 90}, "matting": {"method": "classical"},
                  "fitting": {"all_lr": 0.002}, "meshhead": {"w_laplacian": 10.0},
                  "gaussianhead": {"lr_net": 0.0002, "steps": 99, "plateau_gain_db": 0.2},
                  "landmarks": {"detect_size": 256}}


def _sections(cfg: PipelineConfig, *names: str) -> dict[str, dict]:
    return {n: cfg.section(n).model_dump(mode="json") for n in names}


def _changed(cfg: PipelineConfig, section: str, values: dict) -> PipelineConfig:
    return cfg.model_copy(update={section: cfg.section(section).model_copy(update=values)})


def test_execution_settings_stay_out_of_the_key_and_result_settings_enter_it() -> None:
    cfg = PipelineConfig()
    marked = {(s, k) for s, f in PipelineConfig.model_fields.items()
              for k in f.annotation.model_fields if is_execution(s, k)}
    assert marked == {(s, k) for s, vals in EXECUTION_CHANGES.items() for k in vals}
    for section, values in EXECUTION_CHANGES.items():
        before = config_key(_sections(cfg, section, "capture"))
        for key, value in values.items():
            assert config_key(_sections(_changed(cfg, section, {key: value}), section, "capture")) == before, key
    for section, values in RESULT_CHANGES.items():
        for key, value in values.items():
            other = _changed(cfg, section, {key: value})
            assert config_key(_sections(other, section)) != config_key(_sections(cfg, section)), (section, key)
    # An upstream section a stage reads counts too.
    assert config_key(_sections(_changed(cfg, "capture", {"exclude_sequences": ()}), "capture")) \
        != config_key(_sections(cfg, "capture"))
    # The documentation names every execution setting.
    doc = (ROOT / "docs" / "caching.md").read_text()
    assert all(k in doc for vals in EXECUTION_CHANGES.values() for k in vals)
    assert (ROOT / "docs" / "reference" / "configuration.md").read_text().count(" *(execution)* |") == len(marked)


class _Later(GaussianHeadConfig):
    w_new_loss: float = added_later(0.0, description="a loss weight added in a later release")
    new_device_hint: str = execution("none", description="an execution setting added later")


class _LaterConfig(PipelineConfig):
    gaussianhead: _Later = _Later()


def test_a_setting_added_later_at_its_default_keeps_old_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    old = _sections(PipelineConfig(), "gaussianhead")  # what a manifest of the earlier release recorded
    old_key = config_key(old)
    monkeypatch.setattr("headavatar.contract.config_key.PipelineConfig", _LaterConfig)
    new = _LaterConfig()
    assert "w_new_loss" in _sections(new, "gaussianhead")["gaussianhead"]
    assert config_key(_sections(new, "gaussianhead")) == old_key
    assert config_key(_sections(_changed(new, "gaussianhead", {"new_device_hint": "x"}), "gaussianhead")) == old_key
    assert config_key(_sections(_changed(new, "gaussianhead", {"w_new_loss": 0.5}), "gaussianhead")) != old_key
    assert config_key(old) == old_key  # the old record, keyed by the new schema, keeps its key


class Trainer(Stage):
    """A 'training' stage reading the gaussianhead section, counting its runs and what it resumed."""

    name = "extract"
    inputs = ()
    config_sections = ("gaussianhead",)
    runs = 0
    resumed: ClassVar[list[int | None]] = []

    def run(self, ctx: StageContext) -> None:
        Trainer.runs += 1
        ckpt = Checkpoints(ctx)
        state = ckpt.load()
        Trainer.resumed.append(state["step"] if state else None)
        ckpt.save({"step": 5})
        ctx.outputs.put_bytes("avatar.bin", b"weights")


def test_manifests_and_checkpoints_keyed_on_whole_sections_stay_valid(store: ObjectStore) -> None:
    cfg = tiny_config()
    Trainer.runs, Trainer.resumed = 0, []
    first = run_stage(Trainer(), "018", cfg, store).manifest
    assert first.config_digest == config_key(first.config) != digest(first.config)
    assert first.config["gaussianhead"]["compile"] is True  # the manifest records the sections in full
    # Rewrite the manifest as the release before this one wrote it: keyed on the whole section.
    mkey = manifest_key(store, "018", "extract")
    doc = json.loads(store.get_bytes(mkey))
    doc["config_digest"] = digest(doc["config"])
    store.put_bytes(mkey, json.dumps(doc).encode())
    # Execution settings changed: still a cache hit, nothing recomputed.
    retry = tiny_config("gaussianhead.compile=false", "gaussianhead.device=cpu", "gaussianhead.eval_every=7")
    assert run_stage(Trainer(), "018", retry, store).cached and Trainer.runs == 1
    # A result setting changed: stale, and the reason names that setting alone.
    lr = tiny_config("gaussianhead.lr_net=0.0002", "gaussianhead.compile=false")
    assert stale_reasons(read_manifest(store, "018", "extract"), expected(Trainer(), "018", lr, store)) \
        == ["config gaussianhead.lr_net"]

    # A checkpoint the earlier release tagged with its whole-section key resumes after the upgrade;
    # one of other result settings does not.
    state_key = store.key(stage_prefix("018", "extract"), "_state/checkpoint.pt")
    store.delete(mkey)
    run_stage(Trainer(), "018", cfg, store)
    assert Trainer.resumed[-1] == 5  # the checkpoint of the first run, same result settings
    buf = io.BytesIO()
    whole = digest({"inputs": {}, "config": digest(first.config), "code": 1})
    torch.save({"step": 9, "cache_key": whole, "published": []}, buf)
    store.put_bytes(state_key, buf.getvalue())
    store.delete(mkey)
    run_stage(Trainer(), "018", retry, store)
    # An old checkpoint records its key, not its settings: it resumes only under the same whole sections.
    assert Trainer.resumed[-1] is None
    store.put_bytes(state_key, buf.getvalue())
    store.delete(mkey)
    run_stage(Trainer(), "018", cfg, store)
    assert Trainer.resumed[-1] == 9
    assert run_stage(Trainer(), "018", tiny_config("gaussianhead.lr_net=0.0002"), store).cached is False
    assert Trainer.resumed[-1] is None


@pytest.mark.slow
def test_stage_1_with_other_worker_counts_is_a_cache_hit(store: ObjectStore, tiny_capture: Path,
                                                          s3_env: dict[str, str]) -> None:
    upload_capture(store, tiny_capture)
    base = ["run", "extract", "--capture", "018", "--profile", "demo"]
    r = cli(*base, "--set", "extract.workers=1", env=s3_env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["cached"] is False, r.stderr[-2000:]
    r = cli(*base, "--set", "extract.workers=2", "--set", "extract.prefetch_videos=0", env=s3_env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["cached"] is True, r.stderr[-2000:]
    r = cli(*base, "--set", "extract.jpeg_quality=90", env=s3_env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["cached"] is False, r.stderr[-2000:]
    assert read_manifest(store, "018", "extract").config["extract"]["jpeg_quality"] == 90
    r = cli("status", "--capture", "018", "--profile", "demo", "--set", "extract.workers=5", env=s3_env)
    assert r.returncode == 0, r.stderr
    assert "stale: config extract.jpeg_quality (made" in r.stdout, r.stdout
    assert result_config({"extract": {"workers": 1, "jpeg_quality": 90}}) == {"extract": {"jpeg_quality": 90}}


def test_the_continuation_key_leaves_out_only_the_step_ceilings() -> None:
    """Two trainings that differ only in their ceiling follow one trajectory (continuation_key equal) but are two
    results (config_key differs); any other result setting makes another trajectory."""
    from headavatar.contract.config_key import continuation_key

    base = tiny_config()
    for stage in ("meshhead", "gaussianhead"):
        longer = _sections(tiny_config(f"{stage}.steps=12345"), stage)
        assert continuation_key(longer) == continuation_key(_sections(base, stage))
        assert config_key(longer) != config_key(_sections(base, stage))
        seeded = _sections(tiny_config(f"{stage}.seed=7"), stage)
        assert continuation_key(seeded) != continuation_key(_sections(base, stage))

"""The stage contract: manifest last, cache hit, force, config/input invalidation, cleanup."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import tiny_config
from headavatar.contract.manifest import Manifest
from headavatar.contract.stage import Stage, StageContext, read_manifest, run_stage
from headavatar.errors import ScratchFull, UpstreamMissing
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore
from headavatar.training.checkpoints import Checkpoints

pytestmark = pytest.mark.s3


class Numbers(Stage):
    """Writes N small files; N comes from config so config changes are visible."""

    name = "extract"
    inputs = ()
    config_sections = ("sample",)
    runs = 0

    def run(self, ctx: StageContext) -> None:
        type(self).runs += 1
        assert ctx.scratch.is_dir()
        (ctx.scratch / "tmp.txt").write_text("scratch")
        for i in range(ctx.config.sample.frame_stride):
            ctx.outputs.put_bytes(f"numbers/{i:03d}.txt", str(i).encode())
        ctx.metrics["count"] = ctx.config.sample.frame_stride


class Doubles(Stage):
    name = "sample"
    inputs = ("extract",)
    config_sections = ()

    def run(self, ctx: StageContext) -> None:
        for rel in ctx.upstream["extract"].files:
            value = int(ctx.store.get_bytes(ctx.input_key("extract", rel)))
            ctx.outputs.put_bytes(rel.replace("numbers", "doubles"), str(2 * value).encode())


class Exploding(Numbers):
    def run(self, ctx: StageContext) -> None:
        ctx.outputs.put_bytes("numbers/000.txt", b"partial")
        ctx.outputs.wait()
        raise RuntimeError("boom half-way")


def test_manifest_lists_every_file_with_digest(store: ObjectStore) -> None:
    res = run_stage(Numbers(), "018", tiny_config("sample.frame_stride=3"), store)
    m = res.manifest
    assert not res.cached and sorted(m.files) == ["numbers/000.txt", "numbers/001.txt", "numbers/002.txt"]
    import hashlib
    assert m.files["numbers/002.txt"].sha256 == hashlib.sha256(b"2").hexdigest()
    assert m.files["numbers/002.txt"].size == 1
    assert m.metrics["count"] == 3 and m.metrics["files"] == 3
    assert m.config == {"sample": {"frame_stride": 3}} and len(m.config_digest) == 64
    assert m.package_version and m.wall_time_s >= 0 and m.started_at <= m.finished_at
    stored = Manifest.from_json(store.get_bytes(store.key(stage_prefix("018", "extract"), "manifest.json")))
    assert stored.content_digest == m.content_digest


def test_cache_hit_force_and_config_change(store: ObjectStore) -> None:
    Numbers.runs = 0
    cfg = tiny_config("sample.frame_stride=2")
    first = run_stage(Numbers(), "018", cfg, store)
    again = run_stage(Numbers(), "018", cfg, store)
    assert again.cached and Numbers.runs == 1 and again.manifest.finished_at == first.manifest.finished_at
    forced = run_stage(Numbers(), "018", cfg, store, force=True)
    assert not forced.cached and Numbers.runs == 2
    changed = run_stage(Numbers(), "018", tiny_config("sample.frame_stride=4"), store)
    assert not changed.cached and Numbers.runs == 3 and len(changed.manifest.files) == 4


class Killed(Exception):
    pass


class Training(Numbers):
    """Four steps with a checkpoint after each; ``die_at``: the step after whose checkpoint it is killed."""

    resumed_from: ClassVar[list[int]] = []

    def __init__(self, die_at: int = 0, weights: int = 1):
        self.die_at, self.weights = die_at, weights

    def run(self, ctx: StageContext) -> None:
        checkpoints = Checkpoints(ctx)
        saved = checkpoints.load()
        step = saved["step"] if saved else 0
        type(self).resumed_from.append(step)
        while step < 4:
            step += 1
            checkpoints.save({"step": step, "weights": torch.zeros(self.weights)})
            if step == self.die_at:
                raise Killed
        ctx.outputs.put_bytes("model.txt", b"trained")


def test_a_forced_run_recomputes_once_and_its_retries_resume(store: ObjectStore) -> None:
    """The DAG's Recompute forces once per run (``force_run``): its retries resume the run's own checkpoint and
    take the run's own result, where a bare ``force`` on every try threw away hours of training each time."""
    cfg = tiny_config("sample.frame_stride=2")
    Training.resumed_from = []
    run_stage(Training(), "018", cfg, store)
    with pytest.raises(Killed):
        run_stage(Training(die_at=2), "018", cfg, store, force_run="manual__1")
    retried = run_stage(Training(), "018", cfg, store, force_run="manual__1")
    assert not retried.cached and retried.manifest.forced_by == "manual__1"
    assert Training.resumed_from == [0, 0, 2]  # the forced run started over once, its retry resumed at step 2
    again = run_stage(Training(), "018", cfg, store, force_run="manual__1")  # its task cleared, or lost after exit 0
    assert again.cached and again.manifest.finished_at == retried.manifest.finished_at
    assert run_stage(Training(), "018", cfg, store).cached  # an unforced run takes the forced result
    # Another forced run starts over, past the first run's checkpoint (step 4); so does a bare force, every time.
    with pytest.raises(Killed):
        run_stage(Training(die_at=3), "018", cfg, store, force_run="manual__2")
    run_stage(Training(), "018", cfg, store, force=True)
    assert Training.resumed_from == [0, 0, 2, 0, 0]
    assert read_manifest(store, "018", "extract").forced_by == ""


def test_an_unfinished_training_of_other_settings_resumes_when_they_come_back(store: ObjectStore) -> None:
    """A run under other settings sets the live checkpoint of an unfinished training aside instead of overwriting
    it: an operator who tries a setting in between loses no steps of the long training."""
    a, b = tiny_config("sample.frame_stride=2"), tiny_config("sample.frame_stride=3")
    Training.resumed_from = []
    with pytest.raises(Killed):
        run_stage(Training(die_at=2), "018", a, store)
    with pytest.raises(Killed):
        run_stage(Training(die_at=1), "018", b, store, force=True)  # sets A's step-2 checkpoint aside, forced too
    run_stage(Training(), "018", a, store)  # resumes A at step 2, sets B's aside
    run_stage(Training(), "018", b, store)  # resumes B at step 1
    assert Training.resumed_from == [0, 0, 2, 1]
    # Finished trainings are not set aside (their results are kept variants): nothing is left there.
    state = store.key(stage_prefix("018", "extract"), "_state")
    assert [o.key[len(state) + 1:] for o in store.list(state + "/")] == ["checkpoint.pt"]
    assert run_stage(Training(), "018", a, store).cached and Training.resumed_from == [0, 0, 2, 1]


class CeilingTraining(Stage):
    """Trains to ``meshhead.steps`` (the step ceiling), a checkpoint after each step; its result is the steps."""

    name = "extract"
    inputs = ()
    config_sections = ("meshhead",)
    resumed_from: ClassVar[list[int]] = []

    def run(self, ctx: StageContext) -> None:
        ceiling = ctx.config.meshhead.steps
        checkpoints = Checkpoints(ctx, ceiling=ceiling)
        saved = checkpoints.load()
        step = saved["step"] if saved else 0
        type(self).resumed_from.append(step)
        while step < ceiling:
            step += 1
            checkpoints.save({"step": step})
        ctx.outputs.put_bytes("model.txt", str(step).encode())


def test_raising_a_step_ceiling_continues_the_training(store: ObjectStore) -> None:
    """The ceiling is a result setting (a cache key of its own: going back to it is a kept variant) but it only ends
    the loop: a higher ceiling continues the training from its checkpoint instead of starting over (a day of GPU
    time at GHA's schedule). A checkpoint past a lower ceiling, or of other settings, is not continued."""
    CeilingTraining.resumed_from = []
    for steps in (3, 6):
        run_stage(CeilingTraining(), "018", tiny_config(f"meshhead.steps={steps}"), store)
    assert CeilingTraining.resumed_from == [0, 3]
    assert store.get_bytes(store.key(stage_prefix("018", "extract"), "model.txt")) == b"6"
    assert run_stage(CeilingTraining(), "018", tiny_config("meshhead.steps=3"), store).cached  # a kept variant
    run_stage(CeilingTraining(), "018", tiny_config("meshhead.steps=2"), store)  # its checkpoint is at step 6
    run_stage(CeilingTraining(), "018", tiny_config("meshhead.steps=8", "meshhead.seed=1"), store)  # another training
    assert CeilingTraining.resumed_from == [0, 3, 0, 0]
    # A run that forces a recompute starts over all the same.
    run_stage(CeilingTraining(), "018", tiny_config("meshhead.steps=9", "meshhead.seed=1"), store, force_run="m__1")
    assert CeilingTraining.resumed_from == [0, 3, 0, 0, 0]


def test_a_checkpoint_that_fills_the_scratch_disk_says_so(store: ObjectStore, full_scratch: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save straight to a full disk raised a RuntimeError about a stream position ("unexpected pos"); the
    contract's one-line ScratchFull error names the directory and what to do."""
    monkeypatch.setenv("HEADAVATAR_SCRATCH", str(full_scratch))
    with pytest.raises(ScratchFull, match=f"the scratch directory {full_scratch} is full"):
        run_stage(Training(weights=200_000), "018", tiny_config(), store)  # an 800 kB checkpoint
    assert read_manifest(store, "018", "extract") is None and list(full_scratch.iterdir()) == []


def test_downstream_keys_on_upstream_content(store: ObjectStore) -> None:
    cfg = tiny_config("sample.frame_stride=2")
    run_stage(Numbers(), "018", cfg, store)
    d1 = run_stage(Doubles(), "018", cfg, store)
    assert store.get_bytes(store.key(stage_prefix("018", "sample"), "doubles/001.txt")) == b"2"
    # Byte-identical upstream re-run: downstream stays cached.
    run_stage(Numbers(), "018", cfg, store, force=True)
    assert run_stage(Doubles(), "018", cfg, store).cached
    # Different upstream content: downstream recomputes.
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=3"), store)
    d2 = run_stage(Doubles(), "018", cfg, store)
    assert not d2.cached and d2.manifest.inputs != d1.manifest.inputs and len(d2.manifest.files) == 3


def test_missing_upstream_is_a_clear_error(store: ObjectStore) -> None:
    with pytest.raises(UpstreamMissing, match=r"needs stage 'extract'.*run 'headavatar run extract --capture 042'"):
        run_stage(Doubles(), "042", tiny_config(), store)


def test_failure_half_way_leaves_no_manifest_and_no_scratch(store: ObjectStore, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADAVATAR_SCRATCH", str(tmp_path))
    cfg = tiny_config("sample.frame_stride=2")
    run_stage(Numbers(), "018", cfg, store)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Exploding(), "018", cfg, store, force=True)
    assert read_manifest(store, "018", "extract") is None  # the old one is gone too: outputs changed
    assert list(tmp_path.iterdir()) == []
    res = run_stage(Numbers(), "018", cfg, store)
    assert not res.cached
    assert store.get_bytes(store.key(stage_prefix("018", "extract"), "numbers/000.txt")) == b"0"


def test_stale_outputs_are_removed_and_deleted_outputs_detected(store: ObjectStore) -> None:
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=5"), store)
    res = run_stage(Numbers(), "018", tiny_config("sample.frame_stride=2"), store)
    prefix = store.key(stage_prefix("018", "extract"))
    listed = sorted(o.key[len(prefix) + 1:] for o in store.list(prefix) if "/_variants/" not in o.key)
    assert listed == sorted([*res.manifest.files, "manifest.json"])  # the 5-stride result is a kept variant
    # Someone deletes an output: the manifest no longer counts as a cache hit.
    store.delete(f"{prefix}/numbers/001.txt")
    again = run_stage(Numbers(), "018", tiny_config("sample.frame_stride=2"), store)
    assert not again.cached and store.exists(f"{prefix}/numbers/001.txt")


def test_scratch_of_a_killed_run_is_removed_by_the_next(store: ObjectStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADAVATAR_SCRATCH", str(tmp_path))
    dead = Path(tempfile.mkdtemp(prefix="headavatar-extract-018-", suffix="-pid999999", dir=tmp_path))
    (dead / "half.jpg").write_bytes(b"x")
    run_stage(Numbers(), "018", tiny_config(), store)
    assert not dead.exists()


def test_manifest_json_is_readable(store: ObjectStore) -> None:
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=1"), store)
    doc = json.loads(store.get_bytes(store.key(stage_prefix("018", "extract"), "manifest.json")))
    assert {"stage", "capture", "package_version", "config_digest", "inputs", "files", "metrics",
            "wall_time_s", "content_digest", "code_version", "volatile"} <= doc.keys()

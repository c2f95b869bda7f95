"""Variants: results under other settings stay in the bucket, come back as cache hits, and are pruned."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from headavatar.contract import variants
from headavatar.contract.stage import read_manifest, run_stage
from headavatar.contract.status import capture_status
from headavatar.layout import stage_prefix
from headavatar.storage import ObjectStore
from test_contract import Doubles, Exploding, Numbers

pytestmark = pytest.mark.s3


def _live(store: ObjectStore, stage: str) -> dict[str, bytes]:
    """The live outputs of ``stage`` of capture 018, by relative key (stage-private folders left out)."""
    prefix = store.key(stage_prefix("018", stage))
    return {o.key[len(prefix) + 1:]: store.get_bytes(o.key) for o in store.list(prefix)
            if not o.key[len(prefix) + 1:].startswith("_") and not o.key.endswith("/manifest.json")}


def _kept(store: ObjectStore, stage: str) -> list[int]:
    """The ``sample.frame_stride`` each kept variant of ``stage`` was made with, newest first."""
    found = variants.kept(store, store.key(stage_prefix("018", stage)))
    return [v.manifest.config.get("sample", {}).get("frame_stride") for v in found]


def test_going_back_to_earlier_settings_brings_the_kept_result_back(store: ObjectStore) -> None:
    Numbers.runs = 0
    two, four = tiny_config("sample.frame_stride=2"), tiny_config("sample.frame_stride=4")
    first = run_stage(Numbers(), "018", two, store)
    first_doubles = run_stage(Doubles(), "018", two, store)
    first_files = _live(store, "extract")

    run_stage(Numbers(), "018", four, store)
    changed = run_stage(Doubles(), "018", four, store)
    assert not changed.cached and len(changed.manifest.files) == 4 and Numbers.runs == 2
    assert _kept(store, "extract") == [2]

    back = run_stage(Numbers(), "018", two, store)
    assert back.cached and Numbers.runs == 2  # not computed again
    assert back.manifest.content_digest == first.manifest.content_digest
    assert _live(store, "extract") == first_files  # the 4-stride outputs gone from the live folder
    assert _kept(store, "extract") == [4]  # ... and kept instead
    doubles = run_stage(Doubles(), "018", two, store)  # downstream follows: its variant under these inputs
    assert doubles.cached and doubles.manifest.content_digest == first_doubles.manifest.content_digest

    lines = [line for st in capture_status({"extract": Numbers(), "sample": Doubles()}, "018", two, store)
             for line in st.lines()]
    assert lines[0].startswith("extract       done") and "variant" not in lines[0]
    assert "   variant " in lines[1] and "(4 files; sample.frame_stride=4)" in lines[1], lines
    assert lines[2].startswith("sample        done")
    assert "(4 files; other extract)" in lines[3], lines
    # Under the other settings status says which kept variant a run would bring back.
    lines = [line for st in capture_status({"extract": Numbers()}, "018", four, store) for line in st.lines()]
    assert lines[0].startswith("extract       stale: config sample.frame_stride")
    assert lines[1].endswith("a run now brings it back"), lines


def test_a_failed_run_under_new_settings_loses_nothing(store: ObjectStore) -> None:
    Numbers.runs = 0
    two = tiny_config("sample.frame_stride=2")
    first = run_stage(Numbers(), "018", two, store)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Exploding(), "018", tiny_config("sample.frame_stride=5"), store)
    assert read_manifest(store, "018", "extract") is None  # the live folder is "not done" ...
    back = run_stage(Numbers(), "018", two, store)  # ... but its result was kept before anything changed
    assert back.cached and Numbers.runs == 1 and back.manifest.content_digest == first.manifest.content_digest
    assert _live(store, "extract") == {"numbers/000.txt": b"0", "numbers/001.txt": b"1"}


def test_retention_keeps_the_newest_variants(store: ObjectStore) -> None:
    for stride in (1, 2, 3, 4):
        run_stage(Numbers(), "018", tiny_config(f"sample.frame_stride={stride}", "storage.keep_variants=2"), store)
    assert _kept(store, "extract") == [3, 2]  # 1 was the oldest beyond two
    prefix = store.key(stage_prefix("018", "extract"))
    folders = {o.key[len(prefix) + 1:].split("/")[1] for o in store.list(f"{prefix}/_variants")}
    assert folders == {v.key for v in variants.kept(store, prefix)}  # nothing left of the removed one
    # Forcing a recompute under the live key does not leave that key kept as well.
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=3", "storage.keep_variants=2"), store)
    assert _kept(store, "extract") == [4, 2]
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=3", "storage.keep_variants=2"), store, force=True)
    assert _kept(store, "extract") == [4, 2]
    # 0 keeps none: what is kept goes at the next run, and nothing new is kept.
    run_stage(Numbers(), "018", tiny_config("sample.frame_stride=5", "storage.keep_variants=0"), store)
    assert _kept(store, "extract") == []
    assert not [o.key for o in store.list(f"{prefix}/_variants")]

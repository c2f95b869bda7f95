from pathlib import Path

import pytest

from headavatar.errors import ConfigError
from headavatar.settings import NERSEMBLE_CAMERAS, load_config, parse_override


def test_defaults_are_the_reference_values() -> None:
    cfg = load_config()
    assert cfg.capture.cameras == NERSEMBLE_CAMERAS and len(cfg.capture.cameras) == 16
    assert (cfg.extract.crop_left, cfg.extract.crop_top, cfg.extract.crop_size) == (-200, 304, 2600)
    assert (cfg.extract.output_size, cfg.extract.lowres_size) == (2048, 256)
    assert (cfg.extract.frame_stride, cfg.sample.frame_stride) == (3, 10)


def test_profile_and_overrides_layer_in_order() -> None:
    cfg = load_config("demo", ["sample.frame_stride=5"])
    assert cfg.extract.output_size == 256  # from the profile
    assert cfg.sample.frame_stride == 5  # override beats profile


def test_a_profile_extends_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, ci = load_config("demo"), load_config("ci")
    assert (ci.fitting.pose_steps, ci.fitting.all_steps) == (200, 400)  # its own
    assert ci.model_dump(exclude={"fitting"}) == demo.model_dump(exclude={"fitting"})  # the rest is the demo's
    (tmp_path / "profiles").mkdir()
    (tmp_path / "pipeline.yaml").write_text("{}")
    (tmp_path / "profiles" / "a.yaml").write_text("extends: b\n")
    (tmp_path / "profiles" / "b.yaml").write_text("extends: a\n")
    monkeypatch.setenv("HEADAVATAR_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="profile 'a' extends itself: a -> b -> a"):
        load_config("a")


@pytest.mark.parametrize(("override", "key"), [
    ("extract.frame_stride=0", "extract.frame_stride"),
    ("extract.jpeg_quality=101", "extract.jpeg_quality"),
    ("extract.frame_stride=abc", "extract.frame_stride"),
    ("storage.max_concurrency=0", "storage.max_concurrency"),
    ("extract.nonsense=1", "extract.nonsense"),
    ("capture.cameras=[1]", "capture.cameras"),
    ("storage.prefix=a/../b", "storage.prefix"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_malformed_override_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("no-equals-sign")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [], [bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, [], [tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-profile")


def test_storage_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADAVATAR_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HEADAVATAR_S3_BUCKET", "other-bucket")
    cfg = load_config()
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9" and cfg.storage.bucket == "other-bucket"
    # Credentials have no place in the schema at all.
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["storage.secret_key=abc"])


def test_sequence_selection_defaults_are_the_reference_exclusions() -> None:
    from headavatar.settings import sequence_selected

    c = load_config().capture
    names = ["BACKGROUND", "GLASSES", "EXP-1-head", "EXP-6-tongue-1", "EXP-7-tongue-2", "EXP-9-jaw-2", "HAIR", "FREE",
             "EMO-1-shout+laugh", "SEN-01-cramp_small_danger"]
    used = [n for n in names if sequence_selected(n, c.include_sequences, c.exclude_sequences)]
    assert used == ["EXP-1-head", "EXP-9-jaw-2", "HAIR", "EMO-1-shout+laugh", "SEN-01-cramp_small_danger"]
    only_sen = load_config(None, ["capture.include_sequences=[SEN-*]"]).capture
    assert [n for n in names if sequence_selected(n, only_sen.include_sequences, only_sen.exclude_sequences)] == [
        "SEN-01-cramp_small_danger"]
    assert load_config().extract.color_correction is True
    assert load_config(None, ["capture.cameras=[222200036, 222200037]"]).capture.cameras == ("222200036", "222200037")
    with pytest.raises(ConfigError, match=r"capture.include_sequences.0"):
        load_config(None, ["capture.include_sequences=['../x']"])


def test_held_out_sequences_are_split_from_training_frames() -> None:
    from headavatar.training.views import split_frames

    seqs = ["EXP-1-head", "EXP-1-head", "EXP-2-eyes", "SEN-01-a", "SEN-01-a", "SEN-02-b"]
    assert split_frames(seqs, (), "meshhead.holdout_sequences") == ([0, 1, 2, 3, 4, 5], [])
    assert split_frames(seqs, ("SEN-*",), "meshhead.holdout_sequences") == ([0, 1, 2], [3, 4, 5])
    assert split_frames(seqs, ("EXP-2-eyes", "SEN-02-b"), "meshhead.holdout_sequences") == ([0, 1, 3, 4], [2, 5])
    with pytest.raises(ConfigError, match=r"^meshhead.holdout_sequences: EXP-9 matches none of the fitted sequences"):
        split_frames(seqs, ("EXP-9",), "meshhead.holdout_sequences")
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        split_frames(seqs, ("*",), "gaussianhead.holdout_sequences")

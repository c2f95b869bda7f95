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

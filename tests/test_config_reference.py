"""The configuration reference is generated from the schema and current; every setting is described.

Fails when a setting lacks ``Field(description=...)``, or ``config/pipeline.yaml`` /
``docs/reference/configuration.md`` differ from what the schema generates (run
``python -m headavatar.config_reference --write``). Also ``headavatar config show``.
"""

from __future__ import annotations

import yaml
from pydantic import Field

from conftest import cli
from headavatar import config_reference as ref
from headavatar.settings import PipelineConfig, Section, load_config


def test_every_setting_has_a_description() -> None:
    assert ref.undocumented() == []
    assert len(ref.settings()) >= 88


def test_generated_files_are_current() -> None:
    assert ref.stale() == []


def test_pipeline_yaml_holds_every_default() -> None:
    on_disk = yaml.safe_load(ref.PIPELINE_YAML.read_text())
    defaults = PipelineConfig().model_dump(mode="json")
    assert on_disk == defaults
    assert load_config().model_dump() == PipelineConfig().model_dump()


def test_reference_lists_every_setting_with_default_and_bounds() -> None:
    page = ref.REFERENCE_MD.read_text()
    for s in ref.settings():
        assert f"| `{s.section}.{s.name}` |" in page
    assert "| `extract.jpeg_quality` | int | `95` | >= 50, <= 100 |" in page
    assert "| `matting.method` | one of bmv2, classical | `bmv2` |" in page
    assert "each >= 0, each <= 67" in page  # fitting.exclude_landmarks: bounds of the list's items
    assert "| `ingest.quiet_minutes` | float or null | `60.0` | >= 0, <= 10080 |" in page  # an optional value's


def test_checker_catches_an_undocumented_setting_and_a_stale_file() -> None:
    class Probe(Section):
        """A section for the test."""

        documented: int = Field(1, ge=0, description="has one")
        bare: int = 2

    class ProbeConfig(Section):
        probe: Probe = Probe()

    assert ref.undocumented(ProbeConfig) == ["probe.bare"]
    assert "  documented: 1  # has one [>= 0]" in ref.pipeline_yaml(ProbeConfig)
    assert ref.pipeline_yaml(ProbeConfig) != ref.PIPELINE_YAML.read_text()


def test_config_show_prints_the_effective_configuration() -> None:
    r = cli("config", "show", "--profile", "demo", "--set", "meshhead.steps=7")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown == load_config("demo", ["meshhead.steps=7"]).model_dump(mode="json")
    assert shown["meshhead"]["steps"] == 7 and shown["extract"]["output_size"] == 256
    only = cli("config", "show", "--section", "sample")
    assert yaml.safe_load(only.stdout) == {"sample": PipelineConfig().sample.model_dump(mode="json")}
    bad = cli("config", "show", "--set", "extract.frame_stride=0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: invalid config: extract.frame_stride: Input should be greater than 0 (got 0)"]

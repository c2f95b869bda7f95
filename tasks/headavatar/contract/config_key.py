"""Which settings make a stage's cache key: those that change what it computes.

A section's settings are either result settings (learning rates, steps, crop box: other values,
other outputs) or execution settings, marked :func:`headavatar.settings.execution` (device,
compile, precision, worker counts, evaluation and checkpoint intervals: how the stage runs).
Only result settings enter the key, so a retry with ``gaussianhead.compile=false`` or on another
GPU keeps a finished stage and resumes a training from its checkpoint instead of starting over.
A setting marked :func:`headavatar.settings.added_later` enters the key only when it differs from
its default, so adding a setting to a section leaves every existing key as it was.

A training's step ceiling (marked :func:`headavatar.settings.ceiling`) is a result setting, but it only
ends the training loop: :func:`continuation_key` leaves it out, and a checkpoint of the same continuation
key continues under another ceiling (``training/checkpoints.py``).

The key is computed from a recorded config too (:func:`result_config` takes a live config's dump
or the sections a manifest recorded), so manifests written when the key covered whole sections are
judged by their result settings and stay cache hits.
"""

from __future__ import annotations

from typing import Any

from headavatar.contract.manifest import digest
from headavatar.settings import ADDED_LATER, CEILING, EXECUTION, PipelineConfig, Section, marked


def is_execution(section: str, key: str) -> bool:
    """Whether ``section.key`` only changes how a stage runs (it stays out of cache keys)."""
    known = PipelineConfig.model_fields.get(section)
    field = known.annotation.model_fields.get(key) if known is not None else None
    return field is not None and marked(field, EXECUTION)


def result_settings(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a section as JSON) less its execution settings and its later settings at their default."""
    known = PipelineConfig.model_fields.get(section)  # a section since removed (an old record) counts whole
    fields = known.annotation.model_fields if known is not None else {}
    out = {}
    for key, value in values.items():
        field = fields.get(key)
        if field is not None and marked(field, EXECUTION):
            continue
        if field is not None and marked(field, ADDED_LATER) and value == _json_default(section, key):
            continue
        out[key] = value
    return out


def _json_default(section: str, key: str) -> Any:
    model: type[Section] = PipelineConfig.model_fields[section].annotation
    return model().model_dump(mode="json")[key]


def result_config(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each section's result settings, from sections as JSON (a live config's dump or a manifest's record)."""
    return {name: result_settings(name, values) for name, values in sections.items()}


def config_key(sections: dict[str, dict[str, Any]]) -> str:
    """The config part of a cache key: the digest of the result settings of ``sections``."""
    return digest(result_config(sections))


def continuation_key(sections: dict[str, dict[str, Any]]) -> str:
    """:func:`config_key` less the step ceilings: equal for two configs whose trainings follow one trajectory
    and differ only in where it ends."""
    def without_ceilings(name: str, values: dict[str, Any]) -> dict[str, Any]:
        known = PipelineConfig.model_fields.get(name)
        fields = known.annotation.model_fields if known is not None else {}
        return {k: v for k, v in values.items() if k not in fields or not marked(fields[k], CEILING)}

    return digest({name: without_ceilings(name, values) for name, values in result_config(sections).items()})

"""The configuration reference, generated from the schema (``settings.py``), so it cannot drift from the code.

Two outputs: ``config/pipeline.yaml`` (every default, each key commented with its description and
bounds) and ``docs/reference/configuration.md`` (one table per section). ``--check`` fails when
either file differs from what the schema generates, or a setting has no description; CI runs it
through ``tests/test_config_reference.py``.

    python -m headavatar.config_reference --write   # after changing settings.py
    python -m headavatar.config_reference --check
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from headavatar.settings import EXECUTION, PipelineConfig, marked

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_YAML = ROOT / "config" / "pipeline.yaml"
REFERENCE_MD = ROOT / "docs" / "reference" / "configuration.md"
GENERATED = "python -m headavatar.config_reference --write"


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    type: str
    default: Any
    bounds: str
    description: str
    execution: bool = False  # how the stage runs, not what it computes: outside its cache key


def type_name(tp: Any) -> str:
    """A short, readable name of an annotation: ``int``, ``one of a, b``, ``list of str``, ``str or null``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "list of " + type_name(args[0])
    if getattr(tp, "__metadata__", None) is not None:  # Annotated
        return type_name(args[0])
    return getattr(tp, "__name__", str(tp))


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):  # Field(...) inside Annotated, as in tuple[Annotated[int, Field(ge=0)], ...]
            out += _constraints(m.metadata)
            continue
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(at, attr.capitalize())):
                out.append(f"{sym} {getattr(m, attr)}")
        if isinstance(m, at.MinLen):
            out.append(f"length >= {m.min_length}")
        if isinstance(m, at.MaxLen):
            out.append(f"length <= {m.max_length}")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return out


def bounds(field: FieldInfo) -> str:
    """The field's own constraints, those of an optional value (``Annotated[float, ...] | None``) and
    those of its list items (``tuple[Annotated[int, ...], ...]``)."""
    parts = _constraints(field.metadata)
    origin, args = get_origin(field.annotation), get_args(field.annotation)
    if origin in (Union, types.UnionType):
        for arg in args:
            if getattr(arg, "__metadata__", None):
                parts += _constraints(list(arg.__metadata__))
    if origin is tuple and args and getattr(args[0], "__metadata__", None):
        parts += [f"each {c}" for c in _constraints(list(args[0].__metadata__))]
    return ", ".join(parts)


def settings(model: type[BaseModel] = PipelineConfig) -> list[Setting]:
    """Every setting of every section, in schema order."""
    defaults = model().model_dump(mode="json")
    out = []
    for section, sfield in model.model_fields.items():
        for name, field in sfield.annotation.model_fields.items():  # type: ignore[union-attr]
            out.append(Setting(section, name, type_name(field.annotation), defaults[section][name], bounds(field),
                               (field.description or "").strip(), marked(field, EXECUTION)))
    return out


def undocumented(model: type[BaseModel] = PipelineConfig) -> list[str]:
    return [f"{s.section}.{s.name}" for s in settings(model) if not s.description]


def _yaml_value(value: Any) -> str:
    if isinstance(value, list):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def pipeline_yaml(model: type[BaseModel] = PipelineConfig) -> str:
    """``config/pipeline.yaml``: every default, one commented line per setting."""
    lines = [
        f"# Pipeline defaults, generated from headavatar/settings.py by `{GENERATED}`: edit the schema, not",
        "# this file (tests/test_config_reference.py fails when it is stale). Every key is validated; unknown keys",
        "# are errors. Overlays, later winning: config/profiles/<name>.yaml (--profile), extra files (--config),",
        "# HEADAVATAR_S3_* environment variables, --set key=value. `headavatar config show` prints the result.",
        "# Credentials never go here: boto3 reads them from the environment (an Airflow connection in the DAGs).",
    ]
    section = None
    for s in settings(model):
        if s.section != section:
            section = s.section
            doc = (model.model_fields[section].annotation.__doc__ or "").strip().splitlines()[0]  # type: ignore[union-attr]
            lines += ["", f"{section}:  # {doc}"]
        note = s.description + (f" [{s.bounds}]" if s.bounds else "") + (" (execution)" if s.execution else "")
        lines.append(f"  {s.name}: {_yaml_value(s.default)}  # {note}")
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` outside a code span would end the cell (inside one it does not)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else part.replace("|", "\\|") for part in parts)


def _md(value: Any) -> str:
    text = _yaml_value(value)
    return "`" + text.replace("|", "\\|") + "`"


def reference_markdown(model: type[BaseModel] = PipelineConfig) -> str:
    """The reference page: one table per section (key, type, default, bounds, description)."""
    all_settings = settings(model)
    out = [
        "# Configuration reference", "",
        f"Generated from the schema (`tasks/headavatar/settings.py`) by `{GENERATED}`; "
        "do not edit by hand. "
        f"{len(all_settings)} settings in {len(model.model_fields)} sections. "
        "Set any of them in a profile (`config/profiles/<name>.yaml`, `--profile`), an extra file (`--config`), "
        "or on the command line (`--set section.key=value`); `headavatar config show [--profile X]` prints the "
        "effective configuration. A stage's cache key covers the result settings of the sections it reads; "
        "settings marked *(execution)* change how a stage runs, not what it computes, and stay out of it "
        "(see [Caching](../caching.md#result-settings-and-execution-settings)).",
    ]
    section = None
    for s in all_settings:
        if s.section != section:
            section = s.section
            doc = " ".join((model.model_fields[section].annotation.__doc__ or "").split())  # type: ignore[union-attr]
            out += ["", f"## `{section}`", "", doc, "",
                    "| key | type | default | bounds | description |", "|---|---|---|---|---|"]
        out.append(f"| `{s.section}.{s.name}` | {s.type} | {_md(s.default)} | {cell(s.bounds)} | "
                   f"{cell(s.description)}{' *(execution)*' if s.execution else ''} |")
    return "\n".join(out) + "\n"


def stale() -> list[str]:
    """What --check complains about: undocumented settings and generated files that differ."""
    problems = [f"{key}: no description (Field(description=...) in settings.py)" for key in undocumented()]
    for path, text in ((PIPELINE_YAML, pipeline_yaml()), (REFERENCE_MD, reference_markdown())):
        if not path.exists() or path.read_text() != text:
            problems.append(f"{path.relative_to(ROOT)} is stale: run {GENERATED}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="regenerate config/pipeline.yaml and the reference page")
    g.add_argument("--check", action="store_true", help="exit 1 when either is stale or a setting is undocumented")
    args = p.parse_args(argv)
    if args.write:
        REFERENCE_MD.parent.mkdir(parents=True, exist_ok=True)
        PIPELINE_YAML.write_text(pipeline_yaml())
        REFERENCE_MD.write_text(reference_markdown())
        missing = undocumented()
        if missing:
            print(f"error: settings without a description: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    problems = stale()
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

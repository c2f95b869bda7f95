"""MkDocs hook: fills generated blocks at build time, so no number or setting is copied into a page by hand.

Markers (HTML comments, so a page still reads on GitHub without the build):

* ``<!-- bench: NAME -->``: the table of ``benchmarks/results/NAME.json`` with its provenance;
  ``<!-- bench: * -->`` every results file, one section each.
* ``<!-- settings: SECTION -->``: the configuration table of one section (from the schema).
* ``<!-- capacity -->``: the capacity plan computed from the results files.
* ``<!-- cli -->``: every subcommand's help, from the command's own parser.
* ``<!-- stages -->``: each stage's inputs and cache-key config sections, from the stage classes.

A marker naming a missing results file or section fails the build (``mkdocs build --strict``).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))

from headavatar import config_reference
from headavatar.bench import capacity, tables

log = logging.getLogger("mkdocs.hooks.headavatar")
MISSING: set[str] = set()  # nav pages that do not exist (yet)
MARKER = re.compile(r"<!--\s*(bench|settings|capacity|cli|stages)\s*:?\s*([\w*-]*)\s*-->")


def settings_table(section: str) -> str:
    rows = [s for s in config_reference.settings() if s.section == section]
    if not rows:
        raise ValueError(f"no config section {section!r}")
    lines = ["| key | default | bounds | description |", "|---|---|---|---|"]
    for s in rows:
        lines.append(f"| `{s.section}.{s.name}` | {config_reference._md(s.default)} | "
                     f"{config_reference.cell(s.bounds)} | {config_reference.cell(s.description)} |")
    return "\n".join(lines) + "\n\nAll settings: [Configuration reference](../reference/configuration.md)."


def stages_table() -> str:
    """What each stage reads and which config sections its cache key covers, from the stage classes."""
    from headavatar.stages import build_stages

    lines = ["| stage | code version | reads (upstream stages) | config sections in its cache key |",
             "|---|---|---|---|"]
    for name, stage in build_stages().items():
        reads = ", ".join(f"[{i}]({i}.md)" if i != "raw" else "the raw capture" for i in stage.inputs)
        sections = ", ".join(f"`{c}`" for c in stage.config_sections)
        lines.append(f"| [{name}]({name}.md) | {getattr(stage, 'code_version', '')} | {reads} | {sections} |")
    return "\n".join(lines)


def cli_reference() -> str:
    """Every subcommand's help, from the parser the command itself uses."""
    import argparse

    from headavatar.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        p.prog = f"headavatar {name}"
        out.append(f"## `headavatar {name}`\n\n{helps.get(name, '')}\n\n```text\n{p.format_help().strip()}\n```\n")
    return "\n".join(out)


def expand(kind: str, arg: str) -> str:
    if kind == "bench":
        if arg == "*":
            return "\n".join(f"### `{name}.json`\n\n{tables.render(name)}" for name in tables.all_results())
        return tables.render(arg)
    if kind == "settings":
        return settings_table(arg)
    if kind == "cli":
        return cli_reference()
    if kind == "stages":
        return stages_table()
    return capacity.markdown()


def on_page_markdown(markdown: str, page: object, config: object, files: object) -> str:
    markdown = MARKER.sub(lambda m: expand(m.group(1), m.group(2)), markdown)
    for target in MISSING:  # a link to a page not written yet reads as plain text until it is
        markdown = re.sub(r"\[([^\]]+)\]\((?:\.\./)?" + re.escape(target) + r"(#[^)]*)?\)", r"\1", markdown)
    return markdown


def _prune(nav: list, docs_dir: Path) -> list:
    """The nav without pages that do not exist (yet): other changes add them; the build must not fail meanwhile."""
    out: list = []
    for item in nav:
        if isinstance(item, str):
            entry, target = item, item
        else:
            (title, target), = item.items()
            if isinstance(target, list):
                kept = _prune(target, docs_dir)
                if kept:
                    out.append({title: kept})
                continue
            entry = item
        if (docs_dir / target).exists():
            out.append(entry)
        else:
            log.info("nav: %s does not exist yet, left out (links to it become plain text)", target)
            MISSING.add(target)
    return out


def on_config(config: Any) -> Any:
    config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    return config

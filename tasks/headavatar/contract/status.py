"""Which stages of a capture are done, stale or missing, judged by what a run now would compute from.

A stage is stale when its manifest exists but its code version, config or inputs differ from what
``headavatar run`` would use now (see ``docs/caching.md``); its next run recomputes it, or brings
back the kept variant (``contract/variants.py``) computed under what it would use now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headavatar.contract import variants
from headavatar.contract.config_key import result_config
from headavatar.contract.manifest import Manifest, changed_keys
from headavatar.contract.stage import Stage, expected, read_manifest, stale_reasons
from headavatar.errors import PipelineError
from headavatar.layout import stage_prefix
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore


@dataclass
class StageStatus:
    stage: str
    state: str  # done | stale | missing | unknown
    manifest: Manifest | None
    reasons: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # upstream stages not done now: this one may recompute
    kept: list[variants.Variant] = field(default_factory=list)  # earlier results kept, newest first
    wanted: str = ""  # the cache key a run now would compute under ("" when unknown)

    def lines(self) -> list[str]:
        """The stage's line, then one per kept variant: its key, age, how it differs, its held-out scores."""
        out = [self.line()]
        for v in self.kept:
            m = v.manifest
            scores = ", ".join(f"{k.removeprefix('holdout_')} {val:.4g}" for k, val in sorted(m.metrics.items())
                               if k.startswith("holdout_"))
            hit = "; a run now brings it back" if self.wanted.startswith(v.key) else ""
            out.append(f"{'':13s}   variant {v.key} {m.finished_at} ({len(m.files)} files; "
                       f"{variant_difference(m, self.manifest)}{'; ' + scores if scores else ''}){hit}")
        return out

    def line(self) -> str:
        m = self.manifest
        done = "" if m is None else (f"{m.finished_at} ({len(m.files)} files, {m.wall_time_s:.1f}s, "
                                     f"code v{m.code_version})")
        text = {"done": f"done {done}", "missing": "missing",
                "stale": f"stale: {'; '.join(self.reasons)} (made {done})",
                "unknown": f"unknown: {'; '.join(self.reasons)}"}[self.state]
        if self.after and self.state in ("done", "stale"):
            text += f"; after {', '.join(self.after)} (not done now)"
        return f"{self.stage:13s} {text}"


def capture_status(stages: dict[str, Stage | Exception], capture: str, config: PipelineConfig,
                   store: ObjectStore) -> list[StageStatus]:
    """One entry per stage, in pipeline order; a stage whose code cannot load here is 'unknown'."""
    out: dict[str, StageStatus] = {}
    for name, stage in stages.items():
        m = read_manifest(store, capture, name)
        if isinstance(stage, Exception):
            out[name] = StageStatus(name, "unknown" if m else "missing", m,
                                    [f"stage code not loadable here ({stage})"] if m else [])
            continue
        after = [dep for dep in stage.inputs if dep in out and out[dep].state != "done"]
        if m is None:
            out[name] = StageStatus(name, "missing", None, after=after)
            continue
        try:
            exp = expected(stage, capture, config, store)
        except PipelineError as e:
            out[name] = StageStatus(name, "unknown", m, [f"cannot read its inputs ({e})"], after)
            continue
        reasons = stale_reasons(m, exp)
        if exp.missing:  # an upstream manifest is gone: a run now would fail, then recompute
            reasons = [*reasons, f"upstream {', '.join(exp.missing)} missing"]
        out[name] = StageStatus(name, "stale" if reasons else "done", m, reasons, after,
                                variants.kept(store, store.key(stage_prefix(capture, name))),
                                "" if exp.missing else exp.cache_key)
    return list(out.values())


def variant_difference(variant: Manifest, live: Manifest | None) -> str:
    """How a kept variant differs from the live result: its settings that differ, other inputs, code version."""
    if live is None:
        return "no live result"
    old, now = result_config(variant.config), result_config(live.config)
    parts = [f"{k}={_value(old, k)}" for k in sorted(changed_keys(old, now))]
    parts += [f"other {k}" for k in sorted({*variant.inputs, *live.inputs})
              if variant.inputs.get(k) != live.inputs.get(k)]
    if variant.code_version != live.code_version:
        parts.append(f"code v{variant.code_version}")
    return ", ".join(parts) or "same settings and inputs"


def _value(config: dict, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node

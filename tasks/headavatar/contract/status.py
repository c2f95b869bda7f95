"""Which stages of a capture are done, stale or missing, judged by what a run now would compute from.

A stage is stale when its manifest exists but its code version, config or inputs differ from what
``headavatar run`` would use now (see ``docs/caching.md``); its next run recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headavatar.contract.manifest import Manifest
from headavatar.contract.stage import Stage, expected, read_manifest, stale_reasons
from headavatar.errors import PipelineError
from headavatar.settings import PipelineConfig
from headavatar.storage import ObjectStore


@dataclass
class StageStatus:
    stage: str
    state: str  # done | stale | missing | unknown
    manifest: Manifest | None
    reasons: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # upstream stages not done now: this one may recompute

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
        out[name] = StageStatus(name, "stale" if reasons else "done", m, reasons, after)
    return list(out.values())

"""When training stops paying: the rule that ends stages 5 and 6 before their step ceiling.

Every ``every`` steps the trainer scores its held-out views. Training stops at a check when the
best score of the last ``checks`` checks beats the best score before them by less than ``gain``
(and never before ``min_steps``). Taking the best of a window, not the last value, keeps one noisy
evaluation from ending (or prolonging) a run. The decision reads only the scores at multiples of
``every``, which live in the training state, so a resumed run decides exactly as an undisturbed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NEAR_BEST = 0.5  # dB: a run within this of its curve's best counts as converged (the margin users budget by)


@dataclass(frozen=True)
class PlateauRule:
    metric: str  # the held-out score that must keep rising (higher is better), e.g. holdout_psnr
    every: int  # steps between checks; 0 = the rule is off (train to the ceiling)
    checks: int  # K: the window of recent checks
    gain: float  # the least rise (metric units, dB for PSNR) over the window that keeps training going
    min_steps: int  # never stop before this step

    @classmethod
    def of(cls, cfg: Any, metric: str) -> PlateauRule:
        """The rule a stage config (``plateau_every``, ``plateau_checks``, ``plateau_gain_db``,
        ``plateau_min_steps``) sets."""
        return cls(metric, cfg.plateau_every, cfg.plateau_checks, cfg.plateau_gain_db, cfg.plateau_min_steps)

    def checks_at(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def scores(self, evals: list[dict[str, float]]) -> list[tuple[int, float]]:
        """(step, metric) at each check that scored (the evaluation before training, step 0, included)."""
        return [(e["step"], e[self.metric]) for e in evals
                if self.checks_at(e["step"]) and self.metric in e and not math.isnan(e[self.metric])]

    def plateaued(self, step: int, evals: list[dict[str, float]]) -> bool:
        """Whether training should stop at ``step`` (a check) given every evaluation so far."""
        scored = self.scores(evals)
        if step < self.min_steps or not scored or scored[-1][0] != step or len(scored) <= self.checks:
            return False
        values = [v for _, v in scored]
        return max(values[-self.checks:]) - max(values[:-self.checks]) < self.gain

    def describe(self) -> str:
        if not self.every:
            return "off (fixed schedule)"
        return (f"stop when the best {self.metric} of the last {self.checks} checks (every {self.every} steps) "
                f"beats the best before them by less than {self.gain:g}, never before step {self.min_steps}")


@dataclass(frozen=True)
class Convergence:
    """How a held-out curve converged (the figures users budget GPU time by)."""

    best: float  # the curve's best score
    best_step: int  # the step that scored it (the earliest, on a tie)
    near_step: int  # the first step within NEAR_BEST of it: the steps after it bought less than that


def convergence(scores: list[tuple[int, float]], near: float = NEAR_BEST) -> Convergence | None:
    """Of ``scores`` ((step, score) in step order, higher is better; NaN skipped, as the rule skips it):
    the best and the first step within ``near`` of it; None for a curve without a score."""
    scored = [(s, v) for s, v in scores if not math.isnan(v)]
    if not scored:
        return None
    best_step, best = max(scored, key=lambda sv: (sv[1], -sv[0]))
    return Convergence(best, best_step, next(s for s, v in scored if v >= best - near))

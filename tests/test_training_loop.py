"""The loop both training stages share. The plateau rule: training stops when the held-out score stops
paying, and a resumed run stops where an undisturbed one does (issue 35, item 2). A compiled step that
fails is run again eagerly on the same batch, and the run goes on without compiling."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import copy_stages
from headavatar.contract.stage import read_manifest, run_stage
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.stages import build_stages
from headavatar.storage import ObjectStore
from headavatar.training.loop import Trainer
from headavatar.training.plateau import Convergence, PlateauRule, convergence


def _evals(every: int, scores: list[float]) -> list[dict[str, float]]:
    return [{"step": i * every, "holdout_psnr": s} for i, s in enumerate(scores)]


def _first_stop(rule: PlateauRule, scores: list[float]) -> int | None:
    """The step the rule stops at when the checks see ``scores`` one after another."""
    for i in range(1, len(scores)):
        if rule.plateaued(i * rule.every, _evals(rule.every, scores[: i + 1])):
            return i * rule.every
    return None


RULE = PlateauRule("holdout_psnr", every=100, checks=3, gain=0.1, min_steps=0)


@pytest.mark.parametrize(("scores", "stop"), [
    ([10, 15, 18, 20, 21, 21.5, 21.7, 21.8, 21.85, 21.9], None),  # still rising 0.1 dB or more per 3 checks
    ([10, 15, 18, 20, 20.05, 20.08, 20.09, 20.1], 600),  # 20 -> 20.09: +0.09 dB over the last 3 checks
    ([10, 15, 18, 20, 19.2, 20.05, 20.3, 20.3, 20.3, 20.3], 900),  # one bad evaluation does not end the run
    ([10, 20, 19, 18, 17], 400),  # getting worse: stops once the window is past the best
    ([10, 11, float("nan"), 11, 11, 11], 500),  # a failed evaluation is left out: the window is 3 that scored
    ([10, 11, 11, 11, float("nan")], None),  # ... and a check that failed decides nothing
])
def test_rule_stops_at_the_first_check_whose_window_gained_too_little(scores: list[float], stop: int | None) -> None:
    assert _first_stop(RULE, scores) == stop


def test_rule_waits_for_min_steps_and_is_off_at_every_0() -> None:
    flat = [10.0] * 12
    assert _first_stop(RULE, flat) == 300  # the first check with 3 checks after step 0
    assert _first_stop(PlateauRule("holdout_psnr", 100, 3, 0.1, min_steps=750), flat) == 800
    off = PlateauRule("holdout_psnr", 0, 3, 0.1, 0)
    assert not off.checks_at(100) and off.describe() == "off (fixed schedule)"
    assert "every 100 steps" in RULE.describe()


class Regression(Trainer):
    """A linear model fitted by Adam; held-out PSNR of its predictions: a real, quickly saturating curve."""

    name = "regression"

    def __init__(self, cfg: SimpleNamespace):
        super().__init__(cfg.seed)
        self.cfg, self.device = cfg, torch.device("cpu")
        g = torch.Generator().manual_seed(1)
        self.w_true = torch.randn(8, 1, generator=g)
        self.x_held = torch.randn(64, 8, generator=g)
        torch.manual_seed(cfg.seed)
        self.net = torch.nn.Linear(8, 1)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.02)
        self.plateau = PlateauRule.of(cfg, "holdout_psnr")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.randn(16, 8, generator=self.gen)
        y = x @ self.w_true + 0.05 * torch.randn(16, 1, generator=self.gen)  # noise: the fit saturates
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        mse = torch.nn.functional.mse_loss(self.net(self.x_held), self.x_held @ self.w_true)
        return {"holdout_psnr": float(-10 * torch.log10(mse))}


def _cfg(**kw: int | float) -> SimpleNamespace:
    base = {"steps": 5000, "eval_every": 0, "checkpoint_every": 50, "seed": 0, "plateau_every": 50,
            "plateau_checks": 3, "plateau_gain_db": 0.5, "plateau_min_steps": 200}
    return SimpleNamespace(**{**base, **kw})


def test_convergence_takes_the_best_score_and_the_first_step_near_it() -> None:
    nan = float("nan")
    curve = [(0, 20.0), (5, 30.0), (10, nan), (15, 30.6), (20, 30.6), (25, 30.2)]
    assert convergence(curve) == Convergence(best=30.6, best_step=15, near_step=15)  # a tie: the earlier step
    assert convergence(curve, near=1.0) == Convergence(30.6, 15, 5)
    assert convergence([(0, nan), (5, nan)]) is None and convergence([]) is None  # no score: nothing recorded
    rule = Regression(_cfg(steps=3))  # a curve of NaN only leaves the keys out of the schedule
    rule.state.evals = [{"step": 0, "holdout_psnr": nan}, {"step": 3}]
    assert rule.schedule() == {"steps": 0, "step_ceiling": 3, "stopped_early": 0.0, "kept_step": 0}


class Killed(Exception):
    pass


def test_training_stops_at_the_plateau_and_a_resumed_run_stops_at_the_same_step() -> None:
    saved: list[dict] = []
    full = Regression(_cfg())
    state = full.train(save=saved.append)
    stop = state.stopped_at
    assert 200 <= stop < 5000 and stop % 50 == 0 and state.step == stop
    assert [e["step"] for e in state.evals] == list(range(0, stop + 1, 50))  # the stop's check is the last eval
    psnr = [e["holdout_psnr"] for e in state.evals]
    best = max(psnr)
    near = 50 * next(i for i, v in enumerate(psnr) if v >= best - 0.5)
    assert near < stop  # this rule's gain is 0.5 dB too: its last checks bought less than that
    kept = 50 * psnr.index(best)  # the best check's weights (the last step's if it is the best)
    assert full.schedule() == {"steps": stop, "step_ceiling": 5000, "stopped_early": 1.0, "kept_step": kept,
                               "best_holdout_psnr": best, "best_holdout_psnr_step": kept,
                               "holdout_psnr_near_best_step": near}
    assert psnr[-1] > psnr[0] + 20  # it did learn
    assert max(psnr[-3:]) - max(psnr[:-3]) < 0.5 <= max(psnr[-4:-1]) - max(psnr[:-4])  # first check to stall
    assert saved[-1]["step"] == stop and saved[-1]["stopped_at"] == stop
    assert full.history()["plateau"] == {"rule": full.plateau.describe(), "stopped_at": stop, "kept_step": kept}

    # Killed after the checkpoint 100 steps before the stop: the resumed run stops at the same step, the same way.
    saved_mid: list[dict] = []

    def save_then_die(s: dict) -> None:
        saved_mid.append(s)
        if s["step"] == stop - 100:
            raise Killed

    with pytest.raises(Killed):
        Regression(_cfg()).train(save=save_then_die)
    resumed = Regression(_cfg())
    resumed.load_state_dict(saved_mid[-1])
    again = resumed.train(save=lambda s: None)
    assert again.stopped_at == stop and again.evals == state.evals and again.history == state.history

    # Killed after the stop (while the stage wrote its outputs): resuming trains nothing more.
    after = Regression(_cfg())
    after.load_state_dict(saved[-1])
    assert after.train(save=lambda s: None).evals == state.evals

    # The same run without the rule trains to the ceiling, evaluated at the end only.
    fixed = Regression(_cfg(steps=2 * stop, plateau_every=0)).train(save=lambda s: None)
    assert fixed.step == 2 * stop and fixed.stopped_at == 0 and [e["step"] for e in fixed.evals] == [2 * stop]


# A held-out curve that peaks at step 100 and then falls, as stage 6's novel-view PSNR did after step 30,000 on
# the real-size run (docs/gpu.md, run 5).
OVERFITTING = {0: 10.0, 50: 20.0, 100: 30.0, 150: 29.0, 200: 28.5, 250: 28.0, 300: 27.0}


class Overfitting(Regression):
    """The regression, scored by ``OVERFITTING`` at each step."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"holdout_psnr": OVERFITTING[self.state.step]}


def test_a_stopped_run_keeps_its_best_checks_weights_and_a_resumed_run_the_same() -> None:
    cfg = _cfg(steps=300, plateau_gain_db=0.1, plateau_min_steps=0)
    saved: list[dict] = []
    run = Overfitting(cfg)
    state = run.train(save=lambda s: saved.append(copy.deepcopy(s)))  # a state dict holds the live tensors
    # Stopped at 250 (29, 28.5, 28 do not beat 30 by 0.1 dB); kept: step 100's weights, not step 250's.
    assert (state.stopped_at, state.step, state.kept_step) == (250, 250, 100)
    at = {s["step"]: s["net"] for s in saved}
    assert all(torch.equal(w, at[100][k]) for k, w in run.net.state_dict().items())
    assert not torch.equal(at[100]["weight"], at[250]["weight"])  # the weights moved after the best check
    assert state.kept_eval() == {"step": 100, "holdout_psnr": 30.0}
    assert run.schedule()["kept_step"] == 100 and run.history()["plateau"]["kept_step"] == 100

    # Killed after the checkpoint at step 200 (past the best): the resumed run keeps the same weights.
    def save_then_die(s: dict) -> None:
        if s["step"] == 200:
            saved_mid.append(copy.deepcopy(s))
            raise Killed

    saved_mid: list[dict] = []
    with pytest.raises(Killed):
        Overfitting(cfg).train(save=save_then_die)
    resumed = Overfitting(cfg)
    resumed.load_state_dict(saved_mid[-1])
    assert resumed.train(save=lambda s: None).kept_step == 100
    assert all(torch.equal(w, at[100][k]) for k, w in resumed.net.state_dict().items())

    # At the ceiling the last evaluation counts too: step 150 scores less than step 100, so 100 is kept.
    ceiling = Overfitting(_cfg(steps=150, plateau_gain_db=0.1, plateau_min_steps=0))
    assert ceiling.train(save=lambda s: None).kept_step == 100
    assert all(torch.equal(w, at[100][k]) for k, w in ceiling.net.state_dict().items())

    # Without the rule (a fixed schedule) the last step's weights are kept, whatever the curve.
    fixed = Overfitting(_cfg(steps=300, plateau_every=0, eval_every=50))
    assert fixed.train(save=lambda s: None).kept_step == 300 and fixed.schedule()["kept_step"] == 300


class CompilerBug(torch.autograd.Function):
    """The identity whose backward fails as Inductor's did on a stage-5 shape it had not seen (an H100, 2026-12-06)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise AssertionError("expected size 4==4, stride 270608==273776 at dim=0")


class CompiledRegression(Regression):
    """``Regression`` whose steps run through ``CompilerBug`` from step ``fail_at`` on while ``buggy``;
    ``compiled``: what it tells the loop; stopping compiling fixes the bug unless ``sticky``."""

    def __init__(self, cfg: SimpleNamespace, fail_at: int, compiled: bool = True, sticky: bool = False):
        super().__init__(cfg)
        self.fail_at, self.compiled, self.sticky, self.buggy, self.calls = fail_at, compiled, sticky, True, 0

    def compiling(self) -> bool:
        return self.compiled

    def stop_compiling(self) -> None:
        self.compiled = False
        self.buggy = self.sticky

    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        x = torch.randn(16, 8, generator=self.gen)
        y = x @ self.w_true + 0.05 * torch.randn(16, 1, generator=self.gen)
        pred = self.net(x)
        if self.buggy and self.state.step + 1 >= self.fail_at:
            pred = CompilerBug.apply(pred)
        loss = torch.nn.functional.mse_loss(pred, y)
        return loss, {"loss": loss.detach()}


def test_a_failing_compiled_step_is_run_again_eagerly_on_the_same_batch_and_the_run_goes_on() -> None:
    cfg = _cfg(steps=300, plateau_every=0, eval_every=100)
    eager = Regression(cfg).train(save=lambda s: None)
    t = CompiledRegression(cfg, fail_at=7)
    state = t.train(save=lambda s: None)
    assert state.compile_failed_at == 7 and not t.compiled
    assert t.calls == 301  # step 7 twice, every other step once
    assert state.history == eager.history and state.evals == eager.evals  # same batches, same result
    assert t.schedule()["compile_failed_at_step"] == 7
    assert "compile_failed_at_step" not in Regression(cfg).schedule()

    # Resumed from a checkpoint after the fallback: it stays eager and keeps the step it fell back at.
    saved: list[dict] = []
    CompiledRegression(cfg, fail_at=7).train(save=lambda s: saved.append(copy.deepcopy(s)))  # as if written
    resumed = CompiledRegression(cfg, fail_at=7)
    resumed.load_state_dict(saved[0])  # step 50
    assert not resumed.compiled and resumed.state.compile_failed_at == 7
    assert resumed.train(save=lambda s: None).evals == eager.evals and resumed.calls == 250

    # Running out of memory is not a compiler bug: raised, compile left on.
    class OutOfMemory(CompiledRegression):
        def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            raise torch.OutOfMemoryError("CUDA out of memory")
    oom = OutOfMemory(cfg, fail_at=1)
    with pytest.raises(torch.OutOfMemoryError):
        oom.train(save=lambda s: None)
    assert oom.compiled and oom.state.compile_failed_at == 0

    # An eager step's error is the run's error: nothing to fall back to; so is the eager retry's.
    with pytest.raises(AssertionError, match="stride"):
        CompiledRegression(cfg, fail_at=7, compiled=False).train(save=lambda s: None)
    retried = CompiledRegression(cfg, fail_at=3, sticky=True)
    with pytest.raises(AssertionError, match="stride"):
        retried.train(save=lambda s: None)
    assert retried.calls == 4 and retried.state.compile_failed_at == 3


class Convolution(Regression):
    """The regression through a 3x3 convolution, whose weight has a memory layout (NCHW or channels-last)."""

    def __init__(self, cfg: SimpleNamespace, channels_last: bool):
        super().__init__(cfg)
        torch.manual_seed(cfg.seed)
        self.net = torch.nn.Conv2d(8, 1, 3, padding=1)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.02)

    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.randn(2, 8, 4, 4, generator=self.gen)
        loss = self.net(x).square().mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"holdout_psnr": 0.0}


@pytest.mark.parametrize("saved_channels_last", [False, True])
def test_a_resumed_optimiser_takes_the_layout_of_its_parameters(saved_channels_last: bool) -> None:
    """Stage 6 keeps its super-resolution weights channels-last only when not compiling, and ``compile`` may
    change between attempts. Adam's moments must then follow the parameters' layout: CUDA's fused Adam refuses
    parameters and moments of different strides, which failed every retry at its first step."""
    cfg = _cfg(steps=4, checkpoint_every=3, plateau_every=0)
    saved: list[dict] = []
    Convolution(cfg, saved_channels_last).train(save=lambda s: saved.append(copy.deepcopy(s)))
    resumed = Convolution(cfg, not saved_channels_last)
    resumed.load_state_dict(saved[-1])
    weight = resumed.net.weight
    moments = resumed.opt.state[weight]
    assert weight.is_contiguous(memory_format=torch.channels_last) != saved_channels_last
    for name in ("exp_avg", "exp_avg_sq"):
        assert moments[name].stride() == weight.stride()
        assert torch.equal(moments[name], saved[-1]["optimizer"]["state"][0][name])  # the values unchanged


@pytest.mark.s3
@pytest.mark.slow
def test_meshhead_stage_records_where_the_rule_stopped_it(store: ObjectStore, demo_upstream: str) -> None:
    """The stage's settings reach the rule, and the manifest (so MLflow) and history.json say where it stopped."""
    copy_stages(store, demo_upstream, ("extract", "sample", "matting", "fitting"))
    rule = ["meshhead.plateau_every=20", "meshhead.plateau_checks=2", "meshhead.plateau_min_steps=60",
            "meshhead.plateau_gain_db=10"]  # 10 dB over 40 steps: the demo's mesh head never gains that
    run_stage(build_stages()["meshhead"], "018", load_config("demo", rule), store)
    m = read_manifest(store, "018", "meshhead")
    assert (m.metrics["steps"], m.metrics["step_ceiling"], m.metrics["stopped_early"]) == (60, 300, 1.0)
    assert m.config["meshhead"]["plateau_gain_db"] == 10
    history = json.loads(store.get_bytes(store.key(stage_prefix("018", "meshhead"), "history.json")))
    assert history["plateau"]["stopped_at"] == 60 and "last 2 checks (every 20 steps)" in history["plateau"]["rule"]
    assert [e["step"] for e in history["holdout"]] == [0, 20, 40, 60]
    curve = {e["step"]: e["holdout_psnr"] for e in history["holdout"]}
    best = max(curve.values())
    assert m.metrics["best_holdout_psnr"] == best == curve[m.metrics["best_holdout_psnr_step"]] > curve[0]
    # The model kept is the best check's, and its scores are the stage's.
    assert m.metrics["kept_step"] == history["plateau"]["kept_step"] == m.metrics["best_holdout_psnr_step"]
    assert m.metrics["holdout_psnr"] == best
    assert m.metrics["holdout_psnr_near_best_step"] == min(s for s, v in curve.items() if v >= best - 0.5)

"""The training loop both training stages share: sampling, logging, held-out evaluation, checkpoints.

Everything a resumed attempt needs is in ``state_dict``: the modules, the optimiser, the sampler's
random state, the loss/evaluation/system-usage history and the best-scoring check's weights, so a run
killed after a checkpoint continues with the very batches it would have drawn, its history has every
step exactly once, and it keeps the same model.

With the plateau rule on, a run keeps the weights of its best-scoring check, not its last step's: the rule
stops a run only after checks that did not beat an earlier one, so the last weights are often worse
(0.41 dB on the real-size run 5, docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from headavatar.training.data_parallel import mean_over_ranks, rank_and_world
from headavatar.training.plateau import PlateauRule, convergence
from headavatar.training.system import SystemSampler

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 20.0  # a progress line at least this often (and every 5% of the steps), never silent for long


@dataclass
class TrainState:
    step: int = 0
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # losses every log step
    evals: list[dict[str, float]] = field(default_factory=list)  # held-out metrics by step (0 = before training)
    system: list[dict[str, float]] = field(default_factory=list)  # CPU/memory/GPU usage every log step
    step_seconds: float = 0.0  # time in training steps only (no evaluation, no checkpoints), all attempts
    timed_steps: int = 0
    stopped_at: int = 0  # the step the plateau rule ended training at (0: it did not)
    compile_failed_at: int = 0  # the step whose compiled run failed, so training went on eagerly (0: none did)
    kept_step: int = 0  # the step whose weights the run kept (set when training ends: the best check or the last)
    best: dict[str, Any] | None = None  # the best-scoring check so far: step, score and its modules' weights (CPU)

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / self.step_seconds if self.step_seconds else 0.0

    def kept_eval(self) -> dict[str, float]:
        """The held-out scores of the kept weights (the last evaluation when the last step's were kept)."""
        return next((e for e in reversed(self.evals) if e["step"] == self.kept_step), self.evals[-1])


class Trainer(ABC):
    name: str
    cfg: Any  # a stage config with steps, eval_every, checkpoint_every, keep_checkpoint_every
    opt: torch.optim.Optimizer
    device: torch.device
    plateau: PlateauRule | None = None  # ends training early when the held-out score stops rising

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.state = TrainState()

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]: ...

    def compiling(self) -> bool:
        """Whether steps run ``torch.compile`` graphs (trainers that compile say so)."""
        return False

    def stop_compiling(self) -> None:  # noqa: B027 (optional: only trainers that compile override it)
        """Run every later step eagerly (called after a compiled step failed)."""

    @abstractmethod
    def step_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw a batch with ``self.gen`` and return its loss and the loss terms (detached tensors: reading
        them as floats would make every step wait for the device)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics."""

    def state_dict(self) -> dict:
        return {"step": self.state.step, "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(),
                "history": self.state.history, "evals": self.state.evals, "system": self.state.system,
                "timing": [self.state.step_seconds, self.state.timed_steps], "stopped_at": self.state.stopped_at,
                "compile_failed_at": self.state.compile_failed_at, "best": self.state.best,
                **{k: m.state_dict() for k, m in self.modules().items()}}

    def load_state_dict(self, s: dict) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(s[k])
        self.opt.load_state_dict(s["optimizer"])
        match_parameter_layout(self.opt)
        self.gen.set_state(s["generator"])
        self.state = TrainState(s["step"], s["step"], s["history"], s["evals"], s.get("system", []),
                                *s.get("timing", (0.0, 0)), stopped_at=s.get("stopped_at", 0),
                                compile_failed_at=s.get("compile_failed_at", 0), best=s.get("best"))
        if self.state.compile_failed_at and self.compiling():  # a resumed run stays eager: it would fail again
            self.stop_compiling()

    def schedule(self) -> dict[str, float]:
        """How long training ran against its ceiling and what its steps bought (metrics for the manifest and
        MLflow): the held-out curve's best score, its step, and the first step within ``NEAR_BEST`` of it."""
        out = {"steps": self.state.step, "step_ceiling": self.cfg.steps,
               "stopped_early": float(bool(self.state.stopped_at)), "kept_step": self.state.kept_step}
        if self.state.compile_failed_at:
            out["compile_failed_at_step"] = self.state.compile_failed_at
        metric = self.plateau.metric if self.plateau is not None else None
        conv = convergence([(e["step"], e[metric]) for e in self.state.evals if metric in e]) if metric else None
        if conv is not None:
            out.update({f"best_{metric}": conv.best, f"best_{metric}_step": conv.best_step,
                        f"{metric}_near_best_step": conv.near_step})
        return out

    def plateau_text(self) -> str:
        return self.plateau.describe() if self.plateau is not None else "off (no held-out views)"

    def history(self) -> dict[str, Any]:
        """``history.json``: losses, held-out scores and system usage by step, and the stopping rule."""
        return {"losses": self.state.history, "holdout": self.state.evals, "system": self.state.system,
                "plateau": {"rule": self.plateau_text(), "stopped_at": self.state.stopped_at,
                            "kept_step": self.state.kept_step}}

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when the trainer asks for it (``self.amp``); a no-op otherwise."""
        if getattr(self, "amp", False) and torch.device(self.device).type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_window(self, since_t: float | None, steps: int) -> float:
        """Account the wall time of ``steps`` steps since ``since_t`` (after waiting for the device); now."""
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if since_t is not None and steps:
            self.state.step_seconds += now - since_t
            self.state.timed_steps += steps
        return now

    def train(self, save: Callable[[dict], None], log_every: int = 10) -> TrainState:
        """Run to ``cfg.steps``, or until ``self.plateau`` says the held-out score stopped paying (the
        state is saved at that step, so a resumed attempt stops there too). The step never waits for the
        device: loss terms stay on it and are read (one synchronisation) every ``log_every`` steps, at
        evaluations and at checkpoints."""
        cfg = self.cfg
        rule = self.plateau if self.plateau is not None and self.plateau.every else None
        if torch.device(self.device).type == "cpu":
            # Bit-reproducible on the CPU (a resumed run equals an undisturbed one); on CUDA the
            # rasterisers' atomics make runs differ in the last bits whatever this says.
            torch.use_deterministic_algorithms(True, warn_only=True)
        t0, since = time.monotonic(), self.state.step
        system = SystemSampler(self.device)
        keep = getattr(cfg, "keep_checkpoint_every", 0)
        if self.state.step == 0 and (cfg.eval_every or rule):
            self.state.evals.append({"step": 0, **self.evaluate()})
        window_t: float | None = None  # the first step of an attempt warms up (compilation, allocator): untimed
        window_steps = 0
        last_progress = t0
        for step in range(self.state.step, self.state.stopped_at or cfg.steps):
            parts = self._gradients(step + 1)
            self.opt.step()
            self.state.step = done = step + 1
            window_steps += 1
            if step == since:
                window_t, window_steps = self._sync_window(None, 0), 0
            checking = rule is not None and rule.checks_at(done) and done < cfg.steps
            logged = done % log_every == 0 or done == cfg.steps or checking  # a check may be the last step
            evaluating = (bool(cfg.eval_every) and done % cfg.eval_every == 0 and done < cfg.steps) or checking
            saving = (done % cfg.checkpoint_every == 0 or (keep and done % keep == 0)) and done < cfg.steps
            progress = done % max(1, cfg.steps // 20) == 0 or time.monotonic() - last_progress >= PROGRESS_EVERY_S
            if not (logged or evaluating or saving or progress):
                continue
            values = _floats(parts)  # the one synchronisation of this window
            window_t = self._sync_window(window_t, window_steps)
            window_steps = 0
            if logged:
                self.state.history.append({"step": done, **values})
                self.state.system.append({"step": done, **system.sample()})
            if evaluating:
                self.state.evals.append({"step": done, **self.evaluate()})
                if checking:
                    self._remember_if_best(rule)
            if progress:
                last_progress = time.monotonic()
                rate = (done - since) / max(last_progress - t0, 1e-9)
                log.info("%s: step %d/%d loss %.4f (%.2f steps/s, about %s left)", self.name, done, cfg.steps,
                         values["loss"], rate, remaining(cfg.steps - done, rate))
            if checking and rule.plateaued(done, self.state.evals):
                self.state.stopped_at = done
                log.info("%s: held-out %s rose less than %g over the last %d checks: stopping at step %d of %d",
                         self.name, rule.metric, rule.gain, rule.checks, done, cfg.steps)
                save(self.state_dict())
                break
            if saving:
                save(self.state_dict())
            window_t = self._sync_window(None, 0)
        if not self.state.evals or self.state.evals[-1]["step"] != self.state.step:
            self.state.evals.append({"step": self.state.step, **self.evaluate()})
        self._keep_best(rule)
        return self.state

    def _remember_if_best(self, rule: PlateauRule) -> None:
        """At a check of the rule: a copy of the weights if the check's score (just evaluated) beats every
        earlier check's since training began."""
        score = self.state.evals[-1].get(rule.metric, math.nan)
        if math.isnan(score) or (self.state.best is not None and score <= self.state.best["score"]):
            return
        weights = {k: {n: t.detach().to("cpu", copy=True) for n, t in m.state_dict().items()}
                   for k, m in self.modules().items()}
        self.state.best = {"step": self.state.evals[-1]["step"], "score": score, "modules": weights}

    def _keep_best(self, rule: PlateauRule | None) -> None:
        """The weights the run keeps: the best check's when the rule is on and the last evaluation scored less,
        else the last step's (also when the last evaluation failed: nothing says they are worse)."""
        best, last = self.state.best, self.state.evals[-1].get(rule.metric, math.nan) if rule else math.nan
        self.state.kept_step = self.state.step
        if best is None or best["step"] == self.state.step or math.isnan(last) or last >= best["score"]:
            return
        for k, m in self.modules().items():
            m.load_state_dict(best["modules"][k])
        self.state.kept_step = best["step"]
        log.info("%s: keeping the weights of step %d (held-out %s %.3f; the last step's scored %.3f)", self.name,
                 best["step"], rule.metric, best["score"], last)

    def _gradients(self, step: int) -> dict[str, torch.Tensor]:
        """One step's loss terms, with its gradients in the parameters. A compiled step that fails (an
        Inductor error, e.g. on a shape it has not seen) is run again eagerly, on the same batch, and so
        is every later step: a compiler bug costs speed, not the run. Not so for an eager step's error,
        running out of memory, or several data-parallel ranks (their collectives would fall out of step):
        those are raised."""
        gen = self.gen.get_state() if self.compiling() and rank_and_world()[1] == 1 else None
        try:
            return self._loss_backward()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if gen is None:
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            where = "".join(traceback.format_exception(e)[-12:])  # text: holds no frame
        # Retried outside the handler, so the failed step's graph (held by the traceback) is freed first.
        log.warning("%s: the compiled step %d failed (%s); training goes on without torch.compile",
                    self.name, step, reason)
        log.info("%s: where the compiled step failed:\n%s", self.name, where)
        self.stop_compiling()
        self.state.compile_failed_at = step
        self.gen.set_state(gen)
        return self._loss_backward()

    def _loss_backward(self) -> dict[str, torch.Tensor]:
        loss, parts = self.step_loss()
        parts = mean_over_ranks(parts)  # data-parallel: the terms of all the step's views, not this rank's
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return parts


def remaining(steps: int, rate: float) -> str:
    """``steps`` at ``rate`` steps/s as a person says it: ``40 s``, ``3 min``, ``2 h 10 min``."""
    seconds = steps / max(rate, 1e-9)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def match_parameter_layout(opt: torch.optim.Optimizer) -> None:
    """Lay each of the optimiser's state tensors out like its parameter (strides included).

    ``load_state_dict`` keeps the saved layout, but a parameter's layout may differ between attempts: stage 6
    keeps its super-resolution weights channels-last only when not compiling, and ``compile`` is an execution
    setting a retry may change. CUDA's fused Adam refuses parameters and moments of different strides, so
    such a retry would fail at its first step, and every retry after it."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.Adam:
    """Adam; the fused CUDA kernel on GPUs (one launch for all parameters instead of several per tensor)."""
    return torch.optim.Adam(groups, fused=True) if torch.device(device).type == "cuda" else torch.optim.Adam(groups)


def _floats(parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Loss terms as Python floats with one device-to-host copy."""
    tensors = {k: v for k, v in parts.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in parts.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        out.update(zip(tensors, torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist(),
                       strict=True))
    return {k: out[k] for k in parts}

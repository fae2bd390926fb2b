"""The named pieces of the trainer's loop (`trainer._loop`), each tested on its own
(tests/trainer_parts_test.py): what a step's metrics mean (`DivergenceCheck`, `MetricsLog`),
when the state is saved (`CheckpointPolicy`), when it is evaluated and stopped early
(`PeriodicEval`) and which steps are profiled (`Profiler`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from tsld_jax import guard


class TrainingError(RuntimeError):
    """A run that had to stop: a non-finite loss, a diverged run, bad data found in training."""


class DivergenceCheck:
    """Reads each step's metrics for a run gone wrong: a non-finite loss always stops it; the
    divergence guard's verdicts (`guard.DivergenceGuard`) stop it or warn, as
    config.guard.action says. Its messages name the last checkpoint worth resuming from.

    Args:
      guard_cfg: config.guard (action, patience, loss_rise, collapse_tolerance, zero_grad_norm).
      vocab_size: the student's (log(V) is the loss of uniform predictions).
      checkpointer: anything with `steps()` (the saved steps, ascending) and `directory`.
    """

    def __init__(self, guard_cfg, vocab_size: int, checkpointer):
        self.action = guard_cfg.action
        self.guard = guard.DivergenceGuard(
            vocab_size,
            patience=guard_cfg.patience,
            loss_rise=guard_cfg.loss_rise,
            collapse_tolerance=guard_cfg.collapse_tolerance,
            zero_grad_norm=guard_cfg.zero_grad_norm,
        )
        self._checkpointer = checkpointer
        self._warned: set[int] = set()  # the first steps of the symptoms already warned about

    def state(self) -> dict[str, Any]:
        """What goes into each checkpoint (the guard's reference loss)."""
        return self.guard.state()

    def restore(self, meta: dict[str, Any]) -> None:
        """Takes the guard's state back from a checkpoint's metadata."""
        self.guard.start_loss = meta.get("guard", {}).get("start_loss")

    @property
    def held_since(self) -> int | None:
        """While a symptom that may stop the run is watched, the first step it showed: only a
        run the guard may stop holds its checkpoints back (see config.guard)."""
        return self.guard.suspect_since if self.action == "stop" else None

    def _last_good(self, before: int) -> str:
        good = [s for s in self._checkpointer.steps() if s < before]
        if not good:
            return f"no checkpoint in {self._checkpointer.directory} predates it"
        return (
            f"the last checkpoint from before it is step {good[-1]} in "
            f"{self._checkpointer.directory}"
        )

    def check(self, step: int, values: dict[str, float]) -> None:
        """Raises TrainingError, or warns on stderr (once a symptom), or returns quietly."""
        if not math.isfinite(values["loss"]):
            saved = self._checkpointer.steps()
            kept = (
                f"the last good checkpoint is step {saved[-1]} in {self._checkpointer.directory}"
                if saved
                else f"no checkpoint was saved ({self._checkpointer.directory} holds none)"
            )
            raise TrainingError(f"non-finite loss ({values['loss']}) at step {step}; {kept}")
        verdict = self.guard.update(step, values["gt"], values.get("grad_norm"))
        if verdict is None:
            return
        if self.action == "stop":
            # Metrics of step s describe checkpoint s - 1 (see guard.py).
            raise TrainingError(
                f"training diverged at step {step}: {verdict.reason}, since step {verdict.since} "
                f"(guard.patience={self.guard.patience}); {self._last_good(verdict.since - 1)}"
            )
        if self.action == "warn" and verdict.since not in self._warned:
            self._warned.add(verdict.since)
            print(
                f"warning: step {step}: {verdict.reason} since step {verdict.since}",
                file=sys.stderr,
            )


class MetricsLog:
    """Every step's loss on the progress bar; every `every_steps`-th step's metrics (and the
    last step's), with the learning rate and tokens per second, to the metrics writer.

    Tokens per second time a step from the reading of the step before it to its own reading
    (the loop reads metrics one step late, so that is the step's own time once it is steady).
    """

    def __init__(self, writer, progress, schedule, every_steps: int, total_steps: int, tokens):
        self._writer = writer
        self._progress = progress
        self._schedule = schedule
        self._every_steps = every_steps
        self._total_steps = total_steps
        self._tokens = tokens  # per step
        self.last_time = time.perf_counter()

    def record(self, step: int, values: dict[str, float], started: float) -> None:
        now = time.perf_counter()
        self._progress.set_postfix(loss=f"{values['loss']:.4f}")
        self._progress.update(1)
        if step % self._every_steps == 0 or step == self._total_steps:
            values["lr"] = float(self._schedule(step - 1))
            values["tokens_per_sec"] = self._tokens / max(now - started, 1e-9)
            self._writer.write(step, values)
        self.last_time = now


def read_metrics(step: int, metrics: dict, started: float, check, log) -> None:
    """Fetches one step's metrics from the device and hands them to the check, then the log."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check.check(step, values)
    log.record(step, values, started)


class CheckpointPolicy:
    """When the state is saved: every `every_steps` steps, at the last step and when a signal
    stops the run; not while the divergence guard watches a symptom that may stop the run
    (unless it is the last step or a signal), so the kept checkpoints predate it.

    Args:
      checkpointer: a `checkpoint.Checkpointer` (anything with `save(step, state, meta)`).
      every_steps: config.checkpoint.every_steps.
      total_steps: the run's last step.
    """

    def __init__(self, checkpointer, every_steps: int, total_steps: int):
        self._checkpointer = checkpointer
        self._every_steps = every_steps
        self._total_steps = total_steps

    def due(self, step: int, stopping: bool) -> bool:
        """Whether `step` ends in a save (or in the guard's refusal of one)."""
        return step % self._every_steps == 0 or step == self._total_steps or stopping

    def save(
        self,
        step: int,
        state,
        batches,
        check: DivergenceCheck,
        stopping: bool,
        evaluation: PeriodicEval | None = None,
    ) -> bool:
        """Saves the state, the data position, the guard's and early stopping's states;
        returns whether it did."""
        held = check.held_since
        if held is not None and step != self._total_steps and not stopping:
            logging.warning(
                "step %d: not checkpointing while the divergence guard watches a symptom seen "
                "since step %d",
                step,
                held,
            )
            return False
        meta = {"data": batches.state(), "step": step, "guard": check.state()}
        if evaluation is not None:
            meta["early_stop"] = evaluation.state()
        self._checkpointer.save(step, state, meta)
        return True


class PeriodicEval:
    """The held-out perplexity every `every_steps` steps (0: never), to the metrics writer as
    `eval_ppl`; with `patience` > 0, early stopping on that curve.

    Early stopping keeps the lowest perplexity seen and its step; after `patience` evaluations
    in a row without a lower one, `after_step` returns True and the run ends there. Each new
    best is handed to `on_best(step, params)` (the fp stage writes its export then, so the
    export is the best evaluation's weights, durably, whatever happens after). Its state goes
    into every checkpoint (`state`/`restore`), so a resumed run stops where an unbroken one does.

    Args:
      every_steps: config.eval.every_steps.
      evaluate: `evaluate(params) -> float`, the held-out perplexity.
      writer: the metrics writer.
      patience: config.eval.patience (0: no early stopping).
      on_best: called with (step, params) at each new best, when patience > 0.
    """

    def __init__(
        self,
        every_steps: int,
        evaluate: Callable[[Any], float],
        writer,
        patience: int = 0,
        on_best: Callable[[int, Any], None] | None = None,
    ):
        self._every_steps = every_steps
        self._evaluate = evaluate
        self._writer = writer
        self.patience = patience
        self._on_best = on_best
        self.best_ppl: float | None = None
        self.best_step: int | None = None
        self.since_best = 0  # evaluations since the best one

    @property
    def stopped(self) -> bool:
        """Whether early stopping has ended the run (also after a restore)."""
        return self.patience > 0 and self.since_best >= self.patience

    def after_step(self, step: int, params) -> bool:
        """Evaluates when due; returns whether early stopping ends the run at this step."""
        if not (self._every_steps and step % self._every_steps == 0):
            return False
        ppl = self._evaluate(params)
        self._writer.write(step, {"eval_ppl": ppl})
        if self.patience == 0:
            return False
        # NaN never counts as a best (a NaN loss stops the run anyway, see DivergenceCheck).
        if self.best_ppl is None or ppl < self.best_ppl:
            self.best_ppl, self.best_step, self.since_best = ppl, step, 0
            if self._on_best is not None:
                self._on_best(step, params)
        else:
            self.since_best += 1
        return self.stopped

    def state(self) -> dict[str, Any]:
        """What goes into each checkpoint."""
        return {"best_ppl": self.best_ppl, "best_step": self.best_step, "since": self.since_best}

    def restore(self, meta: dict[str, Any]) -> None:
        """Takes the early-stopping state back from a checkpoint's metadata."""
        saved = meta.get("early_stop") or {}
        self.best_ppl = saved.get("best_ppl")
        self.best_step = saved.get("best_step")
        self.since_best = saved.get("since", 0)


class Profiler:
    """A jax.profiler trace of the steps `first..last` (config.profile.steps) into `directory`:
    started before step `first` is dispatched, stopped once step `last` has finished."""

    def __init__(self, steps: tuple[int, int] | None, directory: str):
        self._steps = steps
        self._directory = directory

    def before_step(self, step: int) -> None:
        if self._steps and step == self._steps[0]:
            jax.profiler.start_trace(self._directory)

    def after_step(self, step: int, state) -> None:
        if self._steps and step == self._steps[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()

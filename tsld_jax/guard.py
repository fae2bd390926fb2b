"""Divergence guard: notices a run that is going nowhere from the metrics each step returns.

Three symptoms, each of which must last `patience` consecutive steps:
- the gt cross-entropy (nats, present for every loss kind) `loss_rise` above the first step's;
- uniform predictions: gt within `collapse_tolerance` of log(vocab size) for a model whose first
  step was clearly below it (lr=1e6 did this with a finite loss and exit 0);
- a global gradient norm at or below `zero_grad_norm` (nothing can change any more).

Metrics of step s describe the parameters *before* step s's update, i.e. the state saved as
checkpoint s - 1; so a symptom first seen at step s condemns the checkpoints from s - 1 on.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Verdict:
    """A symptom that has lasted `patience` steps."""

    step: int  # the step at which the guard acts
    since: int  # the first step that showed the symptom
    reason: str  # one line, e.g. "the gradients are all zero"


class DivergenceGuard:
    """Feed it each step's metrics in order; `update` returns a Verdict once a symptom persists.

    Pure Python (no JAX), so that its rules are unit-tested on plain numbers.
    """

    def __init__(
        self,
        vocab_size: int,
        patience: int = 20,
        loss_rise: float = 3.0,
        collapse_tolerance: float = 0.01,
        zero_grad_norm: float = 0.0,
        start_loss: float | None = None,
    ):
        self.uniform_loss = math.log(vocab_size)
        self.patience = patience
        self.loss_rise = loss_rise
        self.collapse_tolerance = collapse_tolerance
        self.zero_grad_norm = zero_grad_norm
        self.start_loss = start_loss
        self._since: dict[str, int] = {}  # symptom -> first step of its current streak

    def state(self) -> dict[str, float | None]:
        """What a resumed run needs: the reference loss of the run's first step."""
        return {"start_loss": self.start_loss}

    @property
    def suspect_since(self) -> int | None:
        """The first step of the oldest running symptom, or None when all is well."""
        return min(self._since.values()) if self._since else None

    def _symptoms(self, gt: float, grad_norm: float | None) -> dict[str, str]:
        found = {}
        if gt > self.start_loss + self.loss_rise:
            found["rise"] = (
                f"the cross-entropy ({gt:.3f}) is more than {self.loss_rise} nats above the "
                f"first step's ({self.start_loss:.3f})"
            )
        near_uniform = abs(gt - self.uniform_loss) <= self.collapse_tolerance
        if near_uniform and self.start_loss < self.uniform_loss - 1.0:
            found["collapse"] = (
                f"the model predicts a uniform distribution (cross-entropy {gt:.3f} = "
                f"log(vocab size); it started at {self.start_loss:.3f})"
            )
        if grad_norm is not None and grad_norm <= self.zero_grad_norm:
            found["zero_grad"] = "the gradients are all zero"
        return found

    def update(self, step: int, gt: float, grad_norm: float | None = None) -> Verdict | None:
        """Records step `step`'s metrics; a Verdict when a symptom has lasted `patience` steps."""
        if self.start_loss is None:
            self.start_loss = gt
        symptoms = self._symptoms(gt, grad_norm)
        self._since = {name: self._since.get(name, step) for name in symptoms}
        for name, since in sorted(self._since.items(), key=lambda item: item[1]):
            if step - since + 1 >= self.patience:
                return Verdict(step=step, since=since, reason=symptoms[name])
        return None

"""The divergence guard's rules on plain numbers."""

import math

import pytest

from tsld_jax import guard

V = 256
UNIFORM = math.log(V)


def _run(losses, grad_norms=None, **kwargs):
    watcher = guard.DivergenceGuard(V, **{"patience": 3, **kwargs})
    grad_norms = grad_norms or [1.0] * len(losses)
    for step, (loss, norm) in enumerate(zip(losses, grad_norms, strict=True), start=1):
        verdict = watcher.update(step, loss, norm)
        if verdict is not None:
            return verdict, watcher
    return None, watcher


@pytest.mark.parametrize(
    "losses, grad_norms, expected",
    [
        ([2.0, 2.1, 1.9, 1.8, 1.7], None, None),  # a healthy run
        (
            [2.0, 6.0, 6.5, 7.0],
            None,
            (4, 2, "(7.000) is more than 3.0 nats above the first step's (2.000)"),
        ),
        ([2.0, 6.0, 2.0, 6.0, 6.0], None, None),  # the streak must be consecutive
        ([3.0, UNIFORM, UNIFORM, UNIFORM], None, (4, 2, "uniform distribution")),
        ([2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0], (4, 2, "gradients are all zero")),
        # A model that starts near uniform (a random init) is not a collapse.
        ([UNIFORM + 0.001] * 5, None, None),
        # Near but not at log(V): a real, if poor, model.
        ([3.0] + [UNIFORM - 0.05] * 4, None, None),
    ],
)
def test_symptoms(losses, grad_norms, expected):
    verdict, _ = _run(losses, grad_norms)
    if expected is None:
        assert verdict is None
    else:
        step, since, reason = expected
        assert (verdict.step, verdict.since) == (step, since) and reason in verdict.reason


def test_suspect_while_a_streak_runs_and_resume_keeps_the_start():
    watcher = guard.DivergenceGuard(V, patience=5)
    watcher.update(1, 2.0, 1.0)
    assert watcher.suspect_since is None
    watcher.update(2, 9.0, 1.0)
    assert watcher.suspect_since == 2
    watcher.update(3, 2.0, 1.0)
    assert watcher.suspect_since is None
    resumed = guard.DivergenceGuard(V, patience=1, **watcher.state())
    assert resumed.update(7, 5.5, 1.0).since == 7  # 5.5 > 2.0 + 3, against the run's start

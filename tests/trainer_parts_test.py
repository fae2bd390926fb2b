"""The trainer loop's named pieces, each alone (`tsld_jax/trainer_parts.py`): the divergence
check, the metrics log, the checkpoint policy, the periodic evaluation and the profiler, on
plain numbers and stand-ins for the checkpointer, writer and progress bar. The whole loop is
tested through train.py (tests/train_test.py, guard_test.py, divergence_test.py)."""

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

from configs import base
from tsld_jax import trainer, trainer_parts

DIRECTORY = "/runs/x/checkpoints"


class _Checkpointer:
    directory = DIRECTORY

    def __init__(self, steps=()):
        self.saved = {step: None for step in steps}

    def steps(self):
        return sorted(self.saved)

    def save(self, step, state, meta):
        self.saved[step] = (state, meta)


class _Writer:
    def __init__(self):
        self.records = []

    def write(self, step, values):
        self.records.append((step, dict(values)))


class _Progress:
    def __init__(self):
        self.postfix, self.updates = None, 0

    def set_postfix(self, **values):
        self.postfix = values

    def update(self, n):
        self.updates += n


class _Batches:
    def state(self):
        return {"epoch": 1, "position": 7}


def _guard(action="stop", patience=3, loss_rise=1.0):
    cfg = base.get_config().guard
    cfg.action, cfg.patience, cfg.loss_rise = action, patience, loss_rise
    return cfg


def test_training_error_is_the_trainers():
    assert trainer.TrainingError is trainer_parts.TrainingError


# --- DivergenceCheck ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_naming_the_last_checkpoint(loss):
    check = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer([5, 10]))
    message = (
        f"non-finite loss ({loss}) at step 11; the last good checkpoint is step 10 in {DIRECTORY}"
    )
    with pytest.raises(trainer_parts.TrainingError, match=re.escape(message)):
        check.check(11, {"loss": loss, "gt": 2.0})
    empty = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    with pytest.raises(trainer_parts.TrainingError, match="no checkpoint was saved"):
        empty.check(1, {"loss": loss, "gt": 2.0})


def test_guard_stop_names_the_checkpoint_before_the_symptom():
    # loss_rise 1 nat above the first step's 2.0: steps 3-5 (3.5, 3.6, 3.7) show it; with
    # patience 3 the run stops at step 5. Step s's metrics describe checkpoint s - 1, so the
    # symptom condemns checkpoints 2 on: the one to resume from is 1.
    check = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer([1, 2, 3, 4]))
    held = []
    for step, gt in enumerate([2.0, 2.5, 3.5, 3.6], start=1):
        check.check(step, {"loss": gt, "gt": gt, "grad_norm": 1.0})
        held.append(check.held_since)
    assert held == [None, None, 3, 3]
    message = (
        "training diverged at step 5: the cross-entropy (3.700) is more than 1.0 nats above the "
        "first step's (2.000), since step 3 (guard.patience=3); the last checkpoint from before "
        f"it is step 1 in {DIRECTORY}"
    )
    with pytest.raises(trainer_parts.TrainingError, match=re.escape(message)):
        check.check(5, {"loss": 3.7, "gt": 3.7, "grad_norm": 1.0})
    # A symptom that clears releases the checkpoints.
    calm = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    for step, gt in enumerate([2.0, 3.5, 2.0], start=1):
        calm.check(step, {"loss": gt, "gt": gt})
    assert calm.held_since is None


def test_guard_warn_warns_once_a_symptom_and_never_holds_checkpoints(capsys):
    # patience 2: the symptom from step 2 is due at step 3 (and still there at 4: no second
    # warning), clears at step 5; the one from step 6 is due at step 7.
    check = trainer_parts.DivergenceCheck(_guard("warn", patience=2), 100, _Checkpointer())
    for step, gt in enumerate([2.0, 4.0, 4.0, 4.0, 2.0, 4.0, 4.0], start=1):
        check.check(step, {"loss": gt, "gt": gt})
        assert check.held_since is None
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0:2] for line in lines] == [
        ["warning", " step 3"],
        ["warning", " step 7"],
    ]
    assert lines[0].endswith("since step 2") and lines[1].endswith("since step 6")


def test_guard_state_goes_into_and_comes_back_from_a_checkpoint():
    check = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    check.check(1, {"loss": 2.25, "gt": 2.25})
    assert check.state() == {"start_loss": 2.25}
    resumed = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    resumed.restore({"guard": check.state()})
    # The resumed run measures the rise from the first run's first step, not its own.
    resumed.check(2, {"loss": 3.5, "gt": 3.5})
    assert resumed.held_since == 2
    old = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    old.restore({})  # a checkpoint from before the guard
    assert old.state() == {"start_loss": None}


# --- MetricsLog and read_metrics ----------------------------------------------------------------


def test_metrics_log_writes_every_n_steps_and_the_last(monkeypatch):
    monkeypatch.setattr(trainer_parts.time, "perf_counter", lambda: 10.0)
    writer, progress = _Writer(), _Progress()
    log = trainer_parts.MetricsLog(writer, progress, lambda s: 0.5 * s, 3, 7, tokens=128)
    for step in range(1, 8):
        log.record(step, {"loss": 1.0 / step}, started=6.0)
    assert [step for step, _ in writer.records] == [3, 6, 7]
    step, values = writer.records[0]
    # lr of the step's update: schedule(step - 1); tokens over the 4 s from `started` to now.
    assert values == {"loss": 1.0 / 3, "lr": 1.0, "tokens_per_sec": 32.0}
    assert progress.updates == 7 and progress.postfix == {"loss": f"{1 / 7:.4f}"}
    assert log.last_time == 10.0


def test_read_metrics_checks_before_it_logs():
    writer, progress = _Writer(), _Progress()
    log = trainer_parts.MetricsLog(writer, progress, lambda s: 0.0, 1, 10, tokens=1)
    check = trainer_parts.DivergenceCheck(_guard(), 100, _Checkpointer())
    metrics = {"loss": jnp.float32(0.25), "gt": jnp.float32(0.5), "grad_norm": jnp.float32(2.0)}
    trainer_parts.read_metrics(1, metrics, 0.0, check, log)
    assert writer.records[0][1]["loss"] == 0.25 and writer.records[0][1]["gt"] == 0.5
    assert check.state() == {"start_loss": 0.5}
    with pytest.raises(trainer_parts.TrainingError):
        trainer_parts.read_metrics(2, {**metrics, "loss": jnp.float32(jnp.nan)}, 0.0, check, log)
    assert len(writer.records) == 1 and progress.updates == 1  # nothing logged for step 2


# --- CheckpointPolicy ---------------------------------------------------------------------------


def test_checkpoints_are_due_every_n_steps_at_the_end_and_on_a_signal():
    policy = trainer_parts.CheckpointPolicy(_Checkpointer(), every_steps=5, total_steps=12)
    assert [s for s in range(1, 13) if policy.due(s, stopping=False)] == [5, 10, 12]
    assert all(policy.due(s, stopping=True) for s in range(1, 13))


def test_a_checkpoint_holds_the_data_position_and_the_guard():
    checkpointer = _Checkpointer()
    check = trainer_parts.DivergenceCheck(_guard(), 100, checkpointer)
    check.check(1, {"loss": 2.0, "gt": 2.0})
    policy = trainer_parts.CheckpointPolicy(checkpointer, every_steps=5, total_steps=12)
    assert policy.save(5, "state", _Batches(), check, stopping=False)
    assert checkpointer.saved[5] == (
        "state",
        {"data": {"epoch": 1, "position": 7}, "step": 5, "guard": {"start_loss": 2.0}},
    )


@pytest.mark.parametrize(
    ("action", "step", "stopping", "saved"),
    [
        ("stop", 10, False, False),  # held back while the guard may stop the run
        ("stop", 12, False, True),  # the last step is always saved
        ("stop", 10, True, True),  # so is a signal's
        ("warn", 10, False, True),  # a run the guard only warns about saves as usual
    ],
)
def test_checkpoints_wait_while_the_guard_watches(action, step, stopping, saved, caplog):
    checkpointer = _Checkpointer()
    check = trainer_parts.DivergenceCheck(_guard(action, patience=5), 100, checkpointer)
    for s, gt in enumerate([2.0, 3.5], start=1):  # a rise since step 2, not yet due
        check.check(s, {"loss": gt, "gt": gt})
    policy = trainer_parts.CheckpointPolicy(checkpointer, every_steps=5, total_steps=12)
    with caplog.at_level(logging.WARNING):
        assert policy.save(step, "state", _Batches(), check, stopping) == saved
    assert (step in checkpointer.saved) == saved
    assert ("symptom seen since step 2" in caplog.text) == (not saved)


# --- PeriodicEval and Profiler ------------------------------------------------------------------


def test_periodic_eval_every_n_steps():
    writer = _Writer()
    evaluation = trainer_parts.PeriodicEval(3, lambda params: params * 2.0, writer)
    for step in range(1, 8):
        evaluation.after_step(step, float(step))
    assert writer.records == [(3, {"eval_ppl": 6.0}), (6, {"eval_ppl": 12.0})]

    def never(params):
        raise AssertionError("evaluated with eval.every_steps=0")

    off = trainer_parts.PeriodicEval(0, never, writer)
    for step in range(1, 8):
        off.after_step(step, None)


def test_early_stopping_keeps_the_best_and_stops_after_patience_evaluations():
    writer, bests = _Writer(), []
    curve = {2: 9.0, 4: 7.0, 6: 7.0, 8: 6.5, 10: 6.6, 12: 6.7, 14: 6.0}  # 7.0 again is no gain
    evaluation = trainer_parts.PeriodicEval(
        2, lambda step: curve[step], writer, patience=2, on_best=lambda s, p: bests.append(s)
    )
    stop = next(step for step in range(1, 15) if evaluation.after_step(step, step))
    assert stop == 12  # 6.6 and 6.7 after the best, 6.5 at step 8 (6.0 at 14 is never seen)
    assert (evaluation.best_step, evaluation.best_ppl, evaluation.stopped) == (8, 6.5, True)
    assert bests == [2, 4, 8]
    assert [step for step, _ in writer.records] == [2, 4, 6, 8, 10, 12]
    # Into a checkpoint's metadata and back: a resumed run continues the count.
    resumed = trainer_parts.PeriodicEval(2, lambda step: curve[step], writer, patience=3)
    resumed.restore({"early_stop": evaluation.state() | {"since": 1}})
    assert (resumed.best_step, resumed.since_best, resumed.stopped) == (8, 1, False)
    assert not resumed.after_step(12, 12) and resumed.after_step(12, 12)  # counts 2, then 3
    fresh = trainer_parts.PeriodicEval(2, lambda step: curve[step], writer, patience=2)
    fresh.restore({})  # a checkpoint written before early stopping existed
    assert (fresh.best_ppl, fresh.since_best) == (None, 0)


def test_a_checkpoint_holds_early_stoppings_state():
    checkpointer = _Checkpointer()
    check = trainer_parts.DivergenceCheck(_guard(), 100, checkpointer)
    evaluation = trainer_parts.PeriodicEval(1, lambda params: params, _Writer(), patience=2)
    evaluation.after_step(1, 3.0)
    evaluation.after_step(2, 4.0)
    policy = trainer_parts.CheckpointPolicy(checkpointer, every_steps=5, total_steps=12)
    assert policy.save(5, "state", _Batches(), check, False, evaluation)
    assert checkpointer.saved[5][1]["early_stop"] == {"best_ppl": 3.0, "best_step": 1, "since": 1}


def test_the_fp_stage_stops_early_and_exports_its_best_weights(tmp_path, monkeypatch):
    """A run whose held-out perplexity stops falling ends `patience` evaluations after its best,
    saved there; the fp export is the best step's weights; started again, it does nothing."""
    import numpy as np
    import tiny_models

    from tests import checkpoint_test
    from tsld_jax import checkpoint
    from tsld_jax.models import load_model

    model_dir = tmp_path / "model"
    tiny_models.save("llama_tied", str(model_dir))
    words = [f"w{i}" for i in range(tiny_models.VOCAB - 1)]
    tiny_models.save_word_tokenizer(str(model_dir), words)
    # The periodic evaluations' perplexities in call order (steps 2, 4, 6, 8), then the final
    # one: the best is step 4's, and two evaluations without a lower one stop the run at 8.
    scripted = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.7])
    monkeypatch.setattr(trainer, "heldout_ppl", lambda *args, **kwargs: next(scripted))
    cfg = checkpoint_test._smoke_config()
    cfg.stage, cfg.loss.kind, cfg.quant.method = "fp", "gt", "none"
    cfg.model.name_or_path, cfg.model.teacher = str(model_dir), ""
    cfg.train.steps, cfg.eval.every_steps, cfg.eval.patience = 20, 2, 2
    cfg.checkpoint.every_steps, cfg.checkpoint.keep, cfg.log.progress = 4, 5, False
    cfg.data.batch_size = 8  # the eight fake CPU devices of conftest
    workdir = str(tmp_path / "run")
    result = trainer.train_and_evaluate(cfg, workdir)
    assert (result["step"], result["best_step"], result["best_eval_ppl"]) == (8, 4, 4.0)
    assert result["early_stopped"] and result["ppl"] == 4.7
    assert checkpoint.saved_steps(workdir) == [4, 8]
    exported = load_model(result["export"]).params
    at_best = checkpoint.restore_params(cfg, workdir, step=4)[0]
    at_stop = checkpoint.restore_params(cfg, workdir, step=8)[0]
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    same = lambda x, y: all(  # noqa: E731
        np.array_equal(a, b) for a, b in zip(leaves(x), leaves(y), strict=True)
    )
    assert same(exported, at_best) and not same(exported, at_stop)
    before = os.path.getmtime(os.path.join(result["export"], "model.safetensors"))
    again = trainer.train_and_evaluate(cfg, workdir)  # the last scripted value: no step taken
    assert (again["step"], again["best_step"], again["early_stopped"]) == (8, 4, True)
    assert os.path.getmtime(os.path.join(result["export"], "model.safetensors")) == before


def test_early_stopping_needs_periodic_evaluations():
    from tsld_jax import config_utils

    cfg = base.get_config()
    cfg.eval.patience = 3
    with pytest.raises(config_utils.ConfigError, match=r"config.eval.patience: .*every_steps"):
        config_utils.validate(cfg, weights=False)


def test_profiler_traces_its_steps(monkeypatch):
    # (step, before or after it, what the profiler did): started before step 2, stopped after
    # step 4.
    calls, now = [], {}
    monkeypatch.setattr(
        trainer_parts.jax.profiler, "start_trace", lambda d: calls.append((*now["at"], d))
    )
    monkeypatch.setattr(
        trainer_parts.jax.profiler, "stop_trace", lambda: calls.append((*now["at"], "stop"))
    )
    for steps, expected in [
        ((2, 4), [(2, "before", "/w/profile"), (4, "after", "stop")]),
        (None, []),
    ]:
        calls.clear()
        profiler = trainer_parts.Profiler(steps, "/w/profile")
        for step in range(1, 7):
            now["at"] = (step, "before")
            profiler.before_step(step)
            now["at"] = (step, "after")
            profiler.after_step(step, jnp.zeros(2))
        assert calls == expected


def test_a_signal_during_an_evaluation_stops_at_that_step_with_its_checkpoint(
    tmp_path, monkeypatch
):
    """SIGTERM arriving during step 2's evaluation is handled at step 2's boundary, which it
    saves (the evaluation comes before the save decision, so that a checkpoint holds early
    stopping's state); once, the loop stopped at step 2 unsaved and said 'checkpoint 2 saved'."""
    import signal

    from tests import checkpoint_test
    from tsld_jax import checkpoint

    original = trainer_parts.PeriodicEval.after_step

    def signalled(self, step, params):
        early = original(self, step, params)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return early

    monkeypatch.setattr(trainer_parts.PeriodicEval, "after_step", signalled)
    cfg = checkpoint_test._smoke_config()
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.log.progress = 6, 100, False
    cfg.data.batch_size = 8  # the eight fake CPU devices of conftest
    result = trainer.train_and_evaluate(cfg, str(tmp_path))
    assert (result["stopped"], result["signal"], result["step"]) == (True, signal.SIGTERM, 2)
    saver = checkpoint.Checkpointer(str(tmp_path), keep=3)
    assert saver.steps() == [2]
    saver.close()

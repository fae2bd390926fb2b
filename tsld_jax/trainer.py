"""`train_and_evaluate(config, workdir)`: the FP fine-tune or the QAT run that train.py starts."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from typing import Any

import jax
import numpy as np

from tsld_jax import (
    atomic,
    config_utils,
    data,
    logging_utils,
    recipe,
    run_summary,
    sharding,
    train_step,
    trainer_parts,
)
from tsld_jax import checkpoint as checkpoint_lib
from tsld_jax import workdir as workdir_lib
from tsld_jax.evaluation import perplexity
from tsld_jax.models import hf, named
from tsld_jax.quant import rules as rules_lib

# A run that had to stop: a non-finite loss, a diverged run, bad data found in training.
TrainingError = trainer_parts.TrainingError


def check_positions(cfg, *models) -> None:
    """data.block_size must fit every model's learned position table (checked before sampling
    or compiling; past the table the positions clamp and every perplexity is NaN or wrong)."""
    for model in models:
        if model is None:
            continue
        limit = model.spec.position_limit
        if limit is not None and cfg.data.block_size > limit:
            raise config_utils.ConfigError(
                f"config.data.block_size: {cfg.data.block_size} is longer than the "
                f"{limit} positions of {model.source}"
            )


# --- evaluation ---------------------------------------------------------------------------------


def heldout_ppl(params, spec, examples, batch_size: int, quantizer=None) -> float:
    losses = perplexity.evaluate_blocks(
        params,
        spec,
        examples["tokens"],
        batch_size=batch_size,
        quantizer=quantizer,
        loss_mask=examples["loss_mask"] * examples["attention_mask"],
        attention_mask=examples["attention_mask"],
        segment_ids=examples.get("segment_ids"),
        progress=False,
    )
    return perplexity.perplexity(losses)


def write_fp_export(workdir: str, params, student) -> str:
    """Writes the FP stage's model to WORKDIR/export, swapped in whole (`atomic.replacing`):
    a kill or a full disk midway leaves the earlier export (or none), never a mix of the two.

    Returns:
      The export's path.
    """
    export = os.path.join(workdir, "export")
    tokenizer = None if isinstance(student.tokenizer, named.ByteTokenizer) else student.tokenizer
    with atomic.replacing(export, directory=True) as temporary:
        hf.save_hf(temporary, params, student.spec, student.hf_config, tokenizer)
    return export


# --- the run ------------------------------------------------------------------------------------


# A signal that train.py's start-up handler received but whose KeyboardInterrupt was swallowed
# (raised inside a __del__ or a callback): the training loop stops at its first step boundary.
PENDING_SIGNAL: int | None = None


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.signal = PENDING_SIGNAL
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: stop now.
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device_batch(
    batch: dict[str, np.ndarray], batch_sharding, process_local: bool = False
) -> dict[str, jax.Array]:
    # Each process feeds only its own rows of the global batch; with one process this is a
    # plain device_put. In-memory data (BatchIterator) hands every process the global batch,
    # whose rows it slices; shards (data/shards.py) read only this process's rows.
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        if process_local:
            local, shape = value, (len(value) * count, *value.shape[1:])
        else:
            rows = len(value) // count
            local, shape = value[index * rows : (index + 1) * rows], value.shape
        out[key] = jax.make_array_from_process_local_data(batch_sharding, local, shape)
    return out


def train_and_evaluate(cfg, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training run a config describes; returns the final results.

    The workdir is checked and locked (one workdir, one run) and the config compared with the
    stored one (resume means the same run) before any model is loaded or anything compiled.
    """
    config_utils.validate(cfg)
    # Before anything is loaded, sampled or compiled (jax.device_count() compiles nothing).
    config_utils.validate_mesh(cfg, jax.device_count())
    with workdir_lib.hold(workdir):
        checkpoint_lib.check_resume(cfg, workdir)
        try:
            return _train(cfg, workdir)
        except OSError as error:
            if not workdir_lib.is_write_failure(error, workdir):
                raise
            raise checkpoint_lib.write_failure(workdir, error) from None


@dataclasses.dataclass
class _Run:
    """What a run's start, loop and end read, built once by `_prepare`."""

    cfg: Any
    workdir: str
    student: Any  # models.loading.LoadedModel
    teacher: Any  # the same, or None (the fp stage)
    rules: Any
    quantizer: Any  # made once: evaluation's jitted forward takes it as a static argument
    params: Any  # the student's starting latent weights
    batches: Any
    eval_examples: dict[str, np.ndarray]
    total_steps: int
    schedule: Any
    abstract_state: Any
    jitted: train_step.JittedStep
    checkpointer: checkpoint_lib.Checkpointer
    check: trainer_parts.DivergenceCheck
    writer: logging_utils.MetricsWriter | None = None  # opened after the restore, by _start
    evaluation: trainer_parts.PeriodicEval | None = None  # made by _start, with the writer

    def student_ppl(self, params) -> float:
        """The held-out perplexity of the student's (fake-quantized) weights."""
        return heldout_ppl(
            params,
            self.student.spec,
            self.eval_examples,
            self.cfg.eval.batch_size,
            self.quantizer,
        )


def _train(cfg, workdir: str) -> dict[str, Any]:
    run = _prepare(cfg, workdir)
    state, results = _start(run)
    teacher_params = None
    if run.teacher is not None:
        teacher_params = recipe.teacher_params(
            run.teacher.params, cfg, run.jitted.teacher_shardings
        )
    try:
        state, stopped_by = _loop(run, state, teacher_params)
    finally:
        run.checkpointer.close()
    if stopped_by is not None:
        return _stopped(run, state, stopped_by)
    return _finish(run, state, results)


def _prepare(cfg, workdir: str) -> _Run:
    """Models, data, the jitted step and the checkpointer of a run; checks what can be checked
    before anything is compiled (positions, warm-up, pipeline, disk space)."""
    student, teacher = recipe.load_models(cfg)
    check_positions(cfg, student, teacher)
    rules = recipe.quant_rules(cfg)
    params = recipe.initial_student_params(student.params, rules, cfg)
    teacher_pair = (teacher.params, teacher.spec) if teacher is not None else None
    gen_teacher = teacher_pair or (student.params, student.spec)
    vocab_size = student.spec.vocab_size
    batches = data.train_batches(
        cfg.data, cfg.seed, student.tokenizer, vocab_size, gen_teacher, workdir, cfg.log.progress
    )
    eval_examples = data.eval_examples(
        cfg.data, student.tokenizer, vocab_size, gen_teacher, workdir, cfg.log.progress
    )
    total_steps = cfg.train.steps or cfg.train.epochs * batches.batches_per_epoch
    if cfg.train.warmup_steps > total_steps:
        raise config_utils.ConfigError(
            f"config.train.warmup_steps: {cfg.train.warmup_steps} is more than the run's "
            f"{total_steps} steps ({cfg.train.epochs} epochs): the learning rate would never "
            "reach train.lr"
        )

    config_utils.validate_pipeline(cfg, student.spec.num_layers)
    mesh = sharding.config_mesh(cfg.mesh)
    abstract_state, optimizer, schedule = recipe.abstract_state(cfg, params, total_steps)
    # The teacher is passed sharded like the student, in model.teacher_dtype.
    jitted = train_step.jit_train_step(
        student.spec,
        rules,
        cfg.loss,
        cfg.train,
        optimizer,
        abstract_state,
        mesh,
        teacher.params if teacher is not None else None,
        cfg.model.teacher_dtype,
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    checkpointer.check_space(abstract_state)  # before any step: a full disk is one line now
    return _Run(
        cfg=cfg,
        workdir=workdir,
        student=student,
        teacher=teacher,
        rules=rules,
        quantizer=recipe.make_quantizer(rules),
        params=params,
        batches=batches,
        eval_examples=eval_examples,
        total_steps=total_steps,
        schedule=schedule,
        abstract_state=abstract_state,
        jitted=jitted,
        checkpointer=checkpointer,
        check=trainer_parts.DivergenceCheck(cfg.guard, vocab_size, checkpointer),
    )


def _start(run: _Run) -> tuple[train_step.TrainState, dict[str, Any]]:
    """The state to start from: the last checkpoint's (with its data position and guard state)
    or a fresh one, after a fresh run's baselines. Returns it and the results so far."""
    cfg = run.cfg
    restored = run.checkpointer.restore(
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            run.abstract_state,
            run.jitted.state_shardings,
        )
    )
    run.writer = logging_utils.MetricsWriter(run.workdir)
    on_best = None
    if cfg.stage == "fp":  # the export is the best evaluation's weights, written as it is seen
        on_best = lambda step, params: write_fp_export(  # noqa: E731
            run.workdir, jax.device_get(params), run.student
        )
    run.evaluation = trainer_parts.PeriodicEval(
        cfg.eval.every_steps, run.student_ppl, run.writer, cfg.eval.patience, on_best
    )
    results: dict[str, Any] = {}
    if restored is not None:
        state, meta = restored
        run.batches.restore(meta["data"])
        run.check.restore(meta)
        run.evaluation.restore(meta)
        print(f"resuming from step {int(state.step)} in {run.workdir}")
        return state, results
    state = run.jitted.init_state(run.params, cfg.seed)
    run.writer.hparams(cfg.to_dict())
    if cfg.eval.baselines and run.teacher is not None:
        results["teacher_ppl"] = heldout_ppl(
            run.teacher.params, run.teacher.spec, run.eval_examples, cfg.eval.batch_size
        )
        if run.rules is not None:
            ptq = rules_lib.quantize_params(run.params, run.rules)
            results["ptq_ppl"] = heldout_ppl(
                ptq, run.student.spec, run.eval_examples, cfg.eval.batch_size
            )
        run.writer.write(0, {f"baseline_{k}": v for k, v in results.items()})
        print("baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    return state, results


def _loop(run: _Run, state, teacher_params) -> tuple[train_step.TrainState, int | None]:
    """Steps from the state's step to the run's last; returns the state and the signal that
    stopped it (None when it ran to the end). Step n + 1 is dispatched before step n's metrics
    are read, so the device never waits for the host."""
    cfg = run.cfg
    start = int(state.step)
    progress = logging_utils.progress(run.total_steps, start, cfg.log.progress)
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    log = trainer_parts.MetricsLog(
        run.writer, progress, run.schedule, cfg.log.every_steps, run.total_steps, tokens_per_step
    )
    read = lambda pending: trainer_parts.read_metrics(*pending, run.check, log)  # noqa: E731
    profiler = trainer_parts.Profiler(
        config_utils.profile_range(cfg), os.path.join(run.workdir, "profile")
    )
    checkpoints = trainer_parts.CheckpointPolicy(
        run.checkpointer, cfg.checkpoint.every_steps, run.total_steps
    )
    evaluation = run.evaluation
    process_local = getattr(run.batches, "process_local", False)
    pending = None  # (step, metrics, started) of the last step dispatched and not yet read
    if evaluation.stopped:  # a run that early stopping ended, started again: nothing to do
        start = run.total_steps
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, run.total_steps + 1):
                profiler.before_step(step)
                started = log.last_time
                batch = _device_batch(next(run.batches), run.jitted.batch_sharding, process_local)
                state, metrics = run.jitted.fn(state, batch, teacher_params)
                if pending is not None:
                    read(pending)  # One step late: the device is already busy with `step`.
                pending = (step, metrics, started)
                profiler.after_step(step, state)
                # Before the save decision, so that a checkpoint holds early stopping's state
                # after this step's evaluation (a resumed run then stops where this one would).
                early = evaluation.after_step(step, state.params)
                # Read once a step: a signal arriving after the save decision is handled at
                # the next step's boundary, where it is saved.
                signum = stop.signal
                stopping = signum is not None
                if checkpoints.due(step, stopping or early):
                    read(pending)  # Never save a state whose loss is not finite.
                    pending = None
                    checkpoints.save(
                        step, state, run.batches, run.check, stopping or early, evaluation
                    )
                if step == cfg.debug.sigkill_after_step:  # tests: a kill after this save
                    run.checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping:
                    return state, signum
                if early:
                    print(
                        f"early stopping at step {step}: no lower held-out perplexity in "
                        f"{evaluation.patience} evaluations since step {evaluation.best_step} "
                        f"({evaluation.best_ppl:.3f})"
                    )
                    break
            if pending is not None:
                read(pending)
    finally:
        progress.close()
    return state, None


def _stopped(run: _Run, state, signum: int) -> dict[str, Any]:
    run.writer.close()
    if jax.process_index() == 0:
        run_summary.plot_curves(run.workdir, run_summary.baselines(run.workdir))
    name = signal.Signals(signum).name
    print(
        f"stopped by {name} at step {int(state.step)}; checkpoint {int(state.step)} saved in "
        f"{run.checkpointer.directory}; run the same command again to resume",
        file=sys.stderr,
    )
    return {"stopped": True, "signal": int(signum), "step": int(state.step)}


def _finish(run: _Run, state, results: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation, export (fp stage), results.json, plots and closing lines."""
    cfg, workdir = run.cfg, run.workdir
    final_step = int(state.step)
    results["step"] = final_step
    key = "qat_ppl" if run.rules is not None else "ppl"
    results[key] = run.student_ppl(state.params)
    run.writer.write(final_step, {"eval_ppl": results[key]})
    run.writer.close()
    evaluation = run.evaluation
    # Early stopping: the best periodic evaluation, unless the final one is lower still.
    keep_best = evaluation.best_ppl is not None and evaluation.best_ppl <= results[key]
    if evaluation.patience:
        results["best_step"] = evaluation.best_step if keep_best else final_step
        results["best_eval_ppl"] = evaluation.best_ppl if keep_best else results[key]
        results["early_stopped"] = evaluation.stopped
    if cfg.stage == "fp":
        if evaluation.patience and keep_best:  # written at the best step, by on_best
            results["export"] = os.path.join(workdir, "export")
        else:
            results["export"] = write_fp_export(workdir, jax.device_get(state.params), run.student)
    # A resumed run logged its baselines before its first step, in an earlier process.
    results = run_summary.baselines(workdir) | results
    if jax.process_index() == 0:  # every process holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=2)
        run_summary.plot_curves(workdir, results)
    print(
        "results: "
        + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
        )
    )
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    for line in run_summary.closing_lines(results, cfg, final_step * tokens_per_step):
        print(line)
    logging.info("final results %s", results)
    return results

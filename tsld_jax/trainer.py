"""`train_and_evaluate(config, workdir)`: the FP fine-tune or the QAT run that train.py starts."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from tsld_jax import (
    atomic,
    config_utils,
    data,
    guard,
    logging_utils,
    recipe,
    run_summary,
    sharding,
    train_step,
)
from tsld_jax import checkpoint as checkpoint_lib
from tsld_jax import workdir as workdir_lib
from tsld_jax.evaluation import perplexity
from tsld_jax.models import hf, named
from tsld_jax.quant import rules as rules_lib


class TrainingError(RuntimeError):
    """A run that had to stop: a non-finite loss, a diverged run, bad data found in training."""


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


def _train(cfg, workdir: str) -> dict[str, Any]:
    student, teacher = recipe.load_models(cfg)
    check_positions(cfg, student, teacher)
    rules = recipe.quant_rules(cfg)
    quantizer = recipe.make_quantizer(rules)
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
    abstract_with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        jitted.state_shardings,
    )
    restored = checkpointer.restore(abstract_with_shardings)
    writer = logging_utils.MetricsWriter(workdir)
    results: dict[str, Any] = {}
    divergence = guard.DivergenceGuard(
        student.spec.vocab_size,
        patience=cfg.guard.patience,
        loss_rise=cfg.guard.loss_rise,
        collapse_tolerance=cfg.guard.collapse_tolerance,
        zero_grad_norm=cfg.guard.zero_grad_norm,
    )
    if restored is not None:
        state, meta = restored
        batches.restore(meta["data"])
        divergence.start_loss = meta.get("guard", {}).get("start_loss")
        print(f"resuming from step {int(state.step)} in {workdir}")
    else:
        state = jitted.init_state(params, cfg.seed)
        writer.hparams(cfg.to_dict())
        if cfg.eval.baselines and teacher is not None:
            results["teacher_ppl"] = heldout_ppl(
                teacher.params, teacher.spec, eval_examples, cfg.eval.batch_size
            )
            if rules is not None:
                ptq = rules_lib.quantize_params(params, rules)
                results["ptq_ppl"] = heldout_ppl(
                    ptq, student.spec, eval_examples, cfg.eval.batch_size
                )
            writer.write(0, {f"baseline_{k}": v for k, v in results.items()})
            print("baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    teacher_params = (
        recipe.teacher_params(teacher.params, cfg, jitted.teacher_shardings)
        if teacher is not None
        else None
    )
    start = int(state.step)
    profile = config_utils.profile_range(cfg)
    progress = logging_utils.progress(total_steps, start, cfg.log.progress)
    pending: tuple[int, dict, float] | None = None
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    last_time = time.perf_counter()
    warned: set[int] = set()  # the first steps of the symptoms already warned about

    def last_good_checkpoint(before: int) -> str:
        good = [s for s in checkpointer.steps() if s < before]
        if not good:
            return f"no checkpoint in {checkpointer.directory} predates it"
        return f"the last checkpoint from before it is step {good[-1]} in {checkpointer.directory}"

    def handle(step: int, metrics: dict, started: float) -> None:
        nonlocal last_time
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            saved = checkpointer.steps()
            kept = (
                f"the last good checkpoint is step {saved[-1]} in {checkpointer.directory}"
                if saved
                else f"no checkpoint was saved ({checkpointer.directory} holds none)"
            )
            raise TrainingError(f"non-finite loss ({values['loss']}) at step {step}; {kept}")
        verdict = divergence.update(step, values["gt"], values.get("grad_norm"))
        if verdict is not None and cfg.guard.action == "stop":
            # Metrics of step s describe checkpoint s - 1 (see guard.py).
            raise TrainingError(
                f"training diverged at step {step}: {verdict.reason}, since step {verdict.since} "
                f"(guard.patience={cfg.guard.patience}); "
                f"{last_good_checkpoint(verdict.since - 1)}"
            )
        if verdict is not None and cfg.guard.action == "warn" and verdict.since not in warned:
            warned.add(verdict.since)
            print(
                f"warning: step {step}: {verdict.reason} since step {verdict.since}",
                file=sys.stderr,
            )
        now = time.perf_counter()
        progress.set_postfix(loss=f"{values['loss']:.4f}")
        progress.update(1)
        if step % cfg.log.every_steps == 0 or step == total_steps:
            values["lr"] = float(schedule(step - 1))
            values["tokens_per_sec"] = tokens_per_step / max(now - started, 1e-9)
            writer.write(step, values)
        last_time = now

    stopped_by = None
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, total_steps + 1):
                if profile and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                started = last_time
                batch = _device_batch(
                    next(batches), jitted.batch_sharding, getattr(batches, "process_local", False)
                )
                state, metrics = jitted.fn(state, batch, teacher_params)
                if pending is not None:
                    handle(*pending)  # One step late: the device is already busy with `step`.
                pending = (step, metrics, started)
                if profile and step == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                save = step % cfg.checkpoint.every_steps == 0 or step == total_steps
                if save or stop.signal is not None:
                    handle(*pending)  # Never save a state whose loss is not finite.
                    pending = None
                    # Only a run that the guard may stop holds its checkpoints back.
                    suspect = cfg.guard.action == "stop" and divergence.suspect_since is not None
                    if suspect and step != total_steps and stop.signal is None:
                        # Keep the kept checkpoints from before a symptom (see config.guard).
                        logging.warning(
                            "step %d: not checkpointing while the divergence guard watches a "
                            "symptom seen since step %d",
                            step,
                            divergence.suspect_since,
                        )
                    else:
                        meta = {"data": batches.state(), "step": step, "guard": divergence.state()}
                        checkpointer.save(step, state, meta)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                    ppl = heldout_ppl(
                        state.params, student.spec, eval_examples, cfg.eval.batch_size, quantizer
                    )
                    writer.write(step, {"eval_ppl": ppl})
                if step == cfg.debug.sigkill_after_step:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop.signal is not None:
                    stopped_by = stop.signal
                    break
            if pending is not None:
                handle(*pending)
    finally:
        progress.close()
        checkpointer.close()
    if stopped_by is not None:
        writer.close()
        if jax.process_index() == 0:
            run_summary.plot_curves(workdir, run_summary.baselines(workdir))
        name = signal.Signals(stopped_by).name
        print(
            f"stopped by {name} at step {int(state.step)}; checkpoint {int(state.step)} saved in "
            f"{checkpointer.directory}; run the same command again to resume",
            file=sys.stderr,
        )
        return {"stopped": True, "signal": int(stopped_by), "step": int(state.step)}

    final_step = int(state.step)
    results["step"] = final_step
    key = "qat_ppl" if rules is not None else "ppl"
    results[key] = heldout_ppl(
        state.params, student.spec, eval_examples, cfg.eval.batch_size, quantizer
    )
    writer.write(final_step, {"eval_ppl": results[key]})
    writer.close()
    if cfg.stage == "fp":
        results["export"] = write_fp_export(workdir, jax.device_get(state.params), student)
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
    for line in run_summary.closing_lines(results, cfg, final_step * tokens_per_step):
        print(line)
    logging.info("final results %s", results)
    return results

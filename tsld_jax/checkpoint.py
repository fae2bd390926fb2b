"""Orbax checkpoints of a training run, and restoring them for evaluation.

Layout of a workdir:

    config.json            the resolved config (written at start)
    checkpoints/<step>/    orbax: "state" (TrainState: step, params, opt_state, rng) and
                           "meta" (JSON: data-iterator position, step, loss)
    metrics.jsonl, events.out.tfevents.*, export/ (FP stage), profile/

Resume order: `train.py` opens the manager, tries the latest step, and on any failure to read it
warns and falls back to the next older one; with none readable it starts from scratch. The
teacher is never saved: it is an input, rebuilt from the config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import orbax.checkpoint as ocp

from tsld_jax import recipe


class Checkpointer:
    """Saves every `every_steps`, keeps `keep`, restores the newest readable checkpoint."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None):
        """(state, meta) of `step`, or of the newest readable checkpoint; None if there is none."""
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        unreadable = []
        for candidate in candidates:
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                self._quarantine(unreadable)
                return restored["state"], restored["meta"]
            except Exception as error:  # orbax/tensorstore raise many types for a bad file.
                if step is not None:
                    raise
                logging.warning(
                    "checkpoint %d in %s is unreadable (%s); falling back to an older one",
                    candidate,
                    self.directory,
                    str(error).splitlines()[0] if str(error) else error,
                )
                print(f"warning: checkpoint {candidate} is unreadable; trying an older one")
                unreadable.append(candidate)
        self._quarantine(unreadable)
        return None

    def _quarantine(self, steps: list[int]) -> None:
        # Move unreadable checkpoints aside (never delete a user's files) so that the resumed
        # run can save those steps again.
        if not steps:
            return
        target = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
        os.makedirs(target, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            destination = os.path.join(target, f"{step}-{int(time.time())}")
            if os.path.exists(source):
                shutil.move(source, destination)
                print(f"warning: moved unreadable checkpoint {step} to {destination}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(cfg, workdir: str, step: int | None = None):
    """(params, student LoadedModel, quantizer, step) of a run's checkpoint, for evaluation."""
    student, _ = recipe.load_models(cfg, teacher=False)
    rules = recipe.quant_rules(cfg)
    params = recipe.initial_student_params(student.params, rules, cfg)
    # The optimizer's state shapes do not depend on the number of steps.
    abstract, _, _ = recipe.abstract_state(cfg, params, cfg.train.steps)
    checkpointer = Checkpointer(workdir, cfg.checkpoint.keep)
    try:
        restored = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} holds no readable checkpoint")
    state, _ = restored
    return state.params, student, recipe.make_quantizer(rules), int(state.step)


def read_config(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a train.py workdir")
    with open(path) as f:
        return json.load(f)


def restore_for_eval(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The student of a train.py run, ready to evaluate with the quantization it trained with.

    Args:
      workdir: the run's workdir (it holds config.json and checkpoints/).
      step: a checkpointed step; by default the newest readable one.

    Returns:
      dict(params, spec, tokenizer, quantizer (callable or None), step, config, last_eval: the
      last held-out evaluation that metrics.jsonl recorded at or before that step, or None).
    """
    import ml_collections

    config = ml_collections.ConfigDict(read_config(workdir))
    params, student, quantizer, found_step = restore_params(config, workdir, step)
    last_eval = None
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                record = json.loads(line)
                if "eval_ppl" in record and record["step"] <= found_step:
                    last_eval = record
    return {
        "params": params,
        "spec": student.spec,
        "tokenizer": student.tokenizer,
        "quantizer": quantizer,
        "step": found_step,
        "config": config,
        "last_eval": last_eval,
    }

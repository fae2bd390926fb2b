"""Orbax checkpoints of a training run, and restoring them for evaluation.

Layout of a workdir:

    config.json            the resolved config of the run (compared with the new one on resume)
    train.lock             who runs in this workdir now (tsld_jax/workdir.py)
    checkpoints/<step>/    orbax: "state" (TrainState: step, params, opt_state, rng) and
                           "meta" (JSON: data-iterator position, step, loss)
    unreadable_checkpoints/<step>-<time>/   newest checkpoints that did not restore, set aside
    generated_<split>.npz  teacher samples (data.name == "generated"), keyed by what made them
    metrics.jsonl, events.out.tfevents.*, results.json, export/ (FP stage), profile/

Resume order (`train.py`): take the workdir lock; compare config.json with the new config
(`check_resume`: fields in `RESUMABLE_FIELDS` may change, any other difference stops the run);
open the manager and try the newest step, then older ones. Newer checkpoints that did not
restore are moved to unreadable_checkpoints/ (never deleted) and the run says which step it
resumed from; when none restores the run stops and leaves them all in place. Only the training
run moves checkpoints: readers (`restore_params`, `restore_for_eval`, eval.py) never write into
a run, so they work on a read-only copy and beside a live run that deletes old steps. The
teacher is never saved: it is an input, rebuilt from the config.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import orbax.checkpoint as ocp

from tsld_jax import atomic, recipe
from tsld_jax import workdir as workdir_lib

# Config fields that may change between a run and its resume; every other field (model,
# quant, loss, data, seed, stage, the optimizer and train.dtype, ...) is part of what the
# checkpoints mean and must match. An entry ending in "." covers a whole section. Fields not
# listed are identity fields by default, so that a field added later is safe until judged.
RESUMABLE_FIELDS = (
    "train.steps",  # How long the run goes (the lr schedule stretches to the new total).
    "train.epochs",
    "train.remat",  # What the backward recomputes: memory and speed, the same maths.
    "train.microbatches",  # The pipeline's schedule: the same maths, up to rounding.
    "model.attention",  # Which attention kernel: the same maths, up to rounding.
    "data.eval_split",  # What is evaluated, and when.
    "data.eval_blocks",
    "data.eval_path",
    "data.workers",  # Loader threads: the same batches in the same order.
    "eval.",
    "checkpoint.",  # Save cadence and how many are kept.
    "log.",
    "profile.",
    "mesh.",  # How the same state is laid out on devices; orbax restores onto any mesh.
    "debug.",
    "guard.",  # When a diverging run stops or warns: watching, not training.
)


# Fields added after runs already existed, with the value that matches what those runs did: a
# stored config.json without them compares as if it held that value, so older runs resume.
# (Not resumable fields: `model.teacher_dtype` changes the loss, so changing it is a new run.)
ADDED_FIELDS: dict[str, Any] = {
    "model.teacher_dtype": "float32",
    "data.eval_path": "",
    "data.workers": 1,
    "data.document_attention": False,  # Not resumable: it changes the attention, so the maths.
    "eval.patience": 0,
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_resumable_field(name: str) -> bool:
    return any(name == f or (f.endswith(".") and name.startswith(f)) for f in RESUMABLE_FIELDS)


def config_changes(
    stored: dict[str, Any], new: dict[str, Any]
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(identity changes, resumable changes) between two configs, each [(field, old, new)]."""
    old_flat, new_flat = _flatten(stored), _flatten(new)
    missing = "<absent>"
    identity, resumable = [], []
    for name in sorted(set(old_flat) | set(new_flat)):
        old = old_flat.get(name, ADDED_FIELDS.get(name, missing))
        value = new_flat.get(name, missing)
        if old != value:
            (resumable if is_resumable_field(name) else identity).append((name, old, value))
    return identity, resumable


def _show(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)


def check_resume(cfg, workdir: str) -> None:
    """Compares a workdir's stored config with the new one, then stores the new one.

    With no checkpoint in the workdir yet any config is accepted (nothing to mismatch).

    Raises:
      workdir_lib.WorkdirError: the workdir holds checkpoints of a run with another identity, or
        checkpoints without a config.json (nothing to compare with).
    """
    new = json.loads(cfg.to_json())
    path = os.path.join(workdir, "config.json")
    steps = saved_steps(workdir)
    if steps and not os.path.exists(path):
        # Nothing says what these checkpoints are: going on would sample the teacher data
        # afresh over the run's generated_*.npz and store this config as the run's, after which
        # the run's real config would be refused.
        raise workdir_lib.WorkdirError(
            f"--workdir {workdir} holds checkpoints (steps {', '.join(map(str, steps))}) but no "
            "config.json, so whether they belong to this config cannot be checked; restore the "
            "run's config.json, or pass a new --workdir (or move this one aside)"
        )
    if os.path.exists(path) and steps:
        stored = _read_json(path)
        identity, resumable = config_changes(stored, new)
        if identity:
            raise workdir_lib.WorkdirError(
                f"--workdir {workdir} holds checkpoints of another run; these fields differ: "
                f"{_show(identity)}. To keep that run, drop these changes; to start a new one, "
                "pass a new --workdir (or move this one aside)"
            )
        if resumable:
            print(f"resuming with changed settings: {_show(resumable)}")
            logging.info("resuming with changed settings: %s", _show(resumable))
    import jax

    if jax.process_index() == 0:  # one writer in a multi-process run (all hold the same config)
        from tsld_jax import atomic

        atomic.write_text(path, cfg.to_json(indent=2))


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def saved_steps(workdir: str) -> list[int]:
    """The finalized checkpoint steps of a workdir, oldest first (orbax's tmp dirs excluded)."""
    directory = checkpoint_dir(workdir)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(f"{directory}/{n}"))


def last_kept(workdir: str) -> str:
    """'step N (PATH)' of a workdir's newest finalized checkpoint, or 'none'."""
    steps = saved_steps(workdir)
    if not steps:
        return "none"
    return f"step {steps[-1]} ({os.path.join(checkpoint_dir(workdir), str(steps[-1]))})"


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_failure(workdir: str, error: OSError) -> workdir_lib.WriteFailure:
    """The one-line error of a workdir that stopped taking writes mid-run."""
    kept = last_kept(workdir)
    full = error.errno in _FULL
    then = (
        f"the last checkpoint kept is {kept}; the run resumes from it once the workdir "
        + ("has space again" if full else "is writable again")
        if kept != "none"
        else "no checkpoint was saved yet"
    )
    state = "is full" if full else "is no longer writable"
    return workdir_lib.WriteFailure(
        f"--workdir {workdir} {state} ({error.strerror}: {error.filename}); {then}"
    )


def state_bytes(state: Any) -> int:
    """The bytes of every array in `state` (abstract or real): what one checkpoint of it
    holds before orbax's compression."""
    import jax
    import numpy as np

    return sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(state)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )


# orbax compresses each array (zstd): trained float32 weights and Adam moments shrink little,
# fresh ones (zeros, low-entropy initialisations) much more. The space probe refuses only below
# this share of the uncompressed size, so that it never stops a save that would have fitted;
# a save that still does not fit is caught when orbax reports it.
_SPACE_SHARE = 0.5


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def _restore_args(abstract_state: Any):
    return ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
    )


class _HeldOrbaxErrors(logging.Filter):
    """Holds back orbax's error records (without their tracebacks) until the run knows what
    they were.

    A save that failed because the workdir filled up or went read-only is reported by the run
    as one line naming the path and the last checkpoint kept; orbax's own records of it (one per
    thread, each with a traceback: 175 lines) would bury it, and are dropped. Any other failure
    releases them, so nothing orbax said about it is lost.
    """

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "released", False) or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        if record.levelno < logging.ERROR:
            return True
        self.held.append(record)
        return False

    def drop(self) -> None:
        self.held.clear()

    def release(self) -> None:
        held, self.held = self.held, []
        for record in held:
            record.released = True
            logging.getLogger(record.name).handle(record)


_HELD_ORBAX_ERRORS = _HeldOrbaxErrors()


def _quiet_closed_loops(previous):
    # After a failed async save, tensorstore's completion callbacks may still post to the
    # asyncio loop orbax has closed; each reports "Event loop is closed" as unraisable.
    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiet_closed_loops = True
    return hook


class Checkpointer:
    """The training run's checkpoints: saves every `every_steps`, keeps `keep`, resumes."""

    def __init__(self, workdir: str, keep: int = 3):
        logging.getLogger("absl").addFilter(_HELD_ORBAX_ERRORS)  # Adding twice is a no-op.
        if not getattr(sys.unraisablehook, "quiet_closed_loops", False):
            sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # A save cut short by a full disk leaves its N.orbax-checkpoint-tmp directory: the
            # next run removes it (it is never a checkpoint) and so gets its space back.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def _check_writable(self) -> None:
        probe = os.path.join(self.directory, f".write_test.{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as error:
            failure = OSError(error.errno, error.strerror, self.directory)
            raise write_failure(self.workdir, failure) from None

    def check_space(self, state: Any) -> None:
        """Refuses (one WriteFailure line) when the checkpoint directory's file system has less
        free space than a checkpoint of `state` takes (see `_SPACE_SHARE`).

        Creating a file (`_check_writable`) succeeds on a full disk; the checkpoint then fails
        in orbax's threads, midway.
        """
        needed = state_bytes(state)
        stats = os.statvfs(self.directory)
        free = stats.f_bavail * stats.f_frsize
        if free >= needed * _SPACE_SHARE:
            return
        mib = 2**20
        kept = last_kept(self.workdir)
        raise workdir_lib.WriteFailure(
            f"--workdir {self.workdir} is full: {self.directory} has {free / mib:.1f} MiB free "
            f"and a checkpoint takes about {needed / mib:.1f} MiB; "
            + (
                f"the last checkpoint kept is {kept}; the run resumes from it once there is space"
                if kept != "none"
                else "no checkpoint was saved yet; free some space or pass another --workdir"
            )
        )

    def _reported(self, error: Exception) -> None:
        """Raises the one-line WriteFailure for an orbax failure that was a failed write."""
        failure = atomic.os_error_in(error, self.directory)
        if failure is not None:
            _HELD_ORBAX_ERRORS.drop()
            raise write_failure(self.workdir, failure) from None
        try:
            self._check_writable()  # e.g. a read-only workdir, where orbax says something else
        except workdir_lib.WriteFailure:
            _HELD_ORBAX_ERRORS.drop()
            raise
        _HELD_ORBAX_ERRORS.release()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves asynchronously; a workdir that stopped taking writes (read-only, full) is one
        WriteFailure line naming the last checkpoint kept."""
        # Probe first: orbax, handed a read-only directory, waits minutes for signals from its
        # failed threads before it raises. The previous save is waited for first (orbax would
        # wait at the start of this one anyway), so that its failure is reported as such and
        # the free space it leaves is what the probe sees.
        self.wait()
        self._check_writable()
        self.check_space(state)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as error:
            self._reported(error)
            raise

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._reported(error)
            raise

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any):
        """(state, meta) of the newest checkpoint that restores; None if there is none.

        Newer checkpoints that do not restore are moved to unreadable_checkpoints/, so that the
        run can save those steps again; if none restores, all are left in place and this raises.
        """
        steps = sorted(self.steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=_restore_args(abstract_state))
            except Exception as error:  # orbax/tensorstore raise many types for a bad file.
                message = f"checkpoint {step} does not restore ({_first_line(error)})"
                print(f"warning: {message}", file=sys.stderr)
                unreadable.append((step, error))
                continue
            self._set_aside([s for s, _ in unreadable])
            if unreadable:
                print(f"warning: falling back to checkpoint {step}", file=sys.stderr)
            return restored["state"], restored["meta"]
        if unreadable:
            newest, error = unreadable[0]
            raise workdir_lib.WorkdirError(
                f"none of the {len(steps)} checkpoints in {self.directory} restores (newest, "
                f"{newest}: {_first_line(error)}); they are left in place. If the code changed, "
                "use the code that wrote them; to start a new run, pass a new --workdir"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        # Move (never delete: they are a user's files) so the resumed run can save these steps
        # again; only the training run does this, never a reader.
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
        self.wait()
        self.manager.close()
        _HELD_ORBAX_ERRORS.release()  # anything orbax said that no exception reported


def read_checkpoint(workdir: str, abstract_state: Any, step: int | None = None):
    """(state, meta) of `step`, or of the newest checkpoint that restores; without writing.

    A reader of a run never writes into it (no orbax manager, which creates directories and
    cleans up): it lists the step directories itself and restores each with a plain orbax
    Checkpointer, newest first. A checkpoint that does not restore (corrupt, or deleted by the
    live run between the listing and the read) is skipped with a warning naming the step used.

    Raises:
      FileNotFoundError: no checkpoint restores (or `step` does not).
    """
    directory = checkpoint_dir(workdir)
    steps = [step] if step is not None else sorted(saved_steps(workdir), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir} holds no checkpoint")
    skipped = []
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
        for candidate in steps:
            try:
                restored = reader.restore(
                    os.path.join(directory, str(candidate)), args=_restore_args(abstract_state)
                )
            except Exception as error:  # orbax/tensorstore raise many types for a bad file.
                if step is not None:
                    raise FileNotFoundError(
                        f"checkpoint {step} in {directory} does not restore ({_first_line(error)})"
                    ) from None
                skipped.append(f"{candidate} ({_first_line(error)})")
                continue
            if skipped:
                message = (
                    f"checkpoint {', '.join(skipped)} of {workdir} does not restore; "
                    f"using step {candidate}"
                )
                print(f"warning: {message}", file=sys.stderr)
            return restored["state"], restored["meta"]
    raise FileNotFoundError(f"{workdir} holds no readable checkpoint ({'; '.join(skipped)})")


def restore_params(cfg, workdir: str, step: int | None = None):
    """(params, student LoadedModel, quantizer, step) of a run's checkpoint, for evaluation."""
    student, _ = recipe.load_models(cfg, teacher=False)
    rules = recipe.quant_rules(cfg)
    params = recipe.initial_student_params(student.params, rules, cfg)
    # The optimizer's state shapes do not depend on the number of steps.
    abstract, _, _ = recipe.abstract_state(cfg, params, cfg.train.steps)
    # Onto this process's first device, whatever mesh saved it: without a target sharding
    # orbax would rebuild the saving run's, which names devices (and, from a multi-process
    # run, processes) that an evaluation does not have.
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    state, _ = read_checkpoint(workdir, abstract, step)
    return state.params, student, recipe.make_quantizer(rules), int(state.step)


def read_config(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a train.py workdir")
    return _read_json(path)


def _read_json(path: str) -> Any:
    """A run's config.json; one WorkdirError line, naming the file, if it is cut short or damaged
    (before: a JSONDecodeError traceback in train.py, a message without the file in eval.py)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise workdir_lib.WorkdirError(
            f"{path} is unreadable ({error}): cut short or damaged. It is the run's config; "
            "restore it from a copy of the run, or train into a new --workdir"
        ) from None


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

"""Train: `python train.py --config configs/opt2.7b_tsld.py --workdir runs/opt2.7b`.

Without flags it runs the embedded default, ternary TSLD QAT of SmolLM2-135M on a CPU
(configs/smollm2_135m_tsld.py). `--config.a.b=v` overrides any field; a run resumes from the
newest checkpoint in its workdir by itself. Exit status: 0 done, 2 a user mistake (one
`error: ...` line), 1 the machine (a workdir that filled up or went read-only mid-run, one
`error: ...` line), 128 + N stopped by signal N after checkpointing (143 SIGTERM, 130 SIGINT).
"""

import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "configs", "smollm2_135m_tsld.py"
)


def _define_flags(argv) -> tuple[flags.FlagValues, flags.FlagHolder]:
    # A fresh FlagValues per call rather than module-level flags: ml_collections defines one
    # flag per `--config.x` override it finds in the argv it is given, so a second main() in
    # one process (the tests) would define them twice.
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "Training config file.",
        flag_values=values,
        lock_config=True,
        sys_argv=list(argv),
    )
    flags.DEFINE_string(
        "workdir", "runs/default", "Checkpoints, logs and exports go here.", flag_values=values
    )
    flags.DEFINE_bool(
        "multihost",
        False,
        "Join a multi-process run first (one process per host): jax.distributed, with the "
        "coordinator, process count and id from the flags below, the environment "
        "(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or the cluster "
        "(SLURM, Open MPI).",
        flag_values=values,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "--multihost: host:port of process 0.", flag_values=values
    )
    flags.DEFINE_integer(
        "num_processes", None, "--multihost: number of processes.", flag_values=values
    )
    flags.DEFINE_integer("process_id", None, "--multihost: this process's id.", flag_values=values)
    flags.DEFINE_string(
        "plan",
        None,
        "Compile the step for TARGET (a100-40gb:8, h100-80gb:1, h200:1; TPU slices v5e:8, "
        "v5p:2x2x1, v6e-8; cpu:N) without its hardware, print the per-device memory plan and "
        "exit; trains nothing.",
        flag_values=values,
    )
    flags.DEFINE_string(
        "plan-json", None, "With --plan: also write the plan as JSON here.", flag_values=values
    )
    return values, config


def _check_plan_flags(plan_target: str | None, json_path: str | None) -> None:
    """Refuses --plan without a target, --plan-json without --plan or where no file can go,
    before anything is compiled."""
    from tsld_jax import cli_errors

    if plan_target is None:
        if json_path is not None:
            raise cli_errors.UsageError("--plan-json applies to --plan (it writes the memory plan)")
        return
    if not plan_target.strip():
        raise cli_errors.UsageError("--plan needs a target such as h100-80gb:8 or cpu:8")
    if json_path is None:
        return
    if not json_path.strip():
        raise cli_errors.UsageError("--plan-json needs a file name")
    if os.path.isdir(json_path):
        raise cli_errors.UsageError(f"--plan-json {json_path} is a directory; name a file")
    folder = os.path.dirname(os.path.abspath(json_path))
    if not os.path.isdir(folder):
        raise cli_errors.UsageError(
            f"--plan-json {json_path}: the directory {folder} does not exist"
        )


def _plan(config, target: str, json_path: str | None) -> int:
    kind, _, count = target.partition(":")
    if kind == "cpu" and count.isdigit() and "jax" not in sys.modules:
        # Fake CPU devices must be asked for before jax starts.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        )
    from tsld_jax import aot, atomic, cli_errors, plan

    try:
        out = plan.plan(config, target)
    except aot.PluginMissing as error:
        # Not the user's input but this machine's install: exit 1, as docs/errors.md says.
        print(f"error: --plan {target}: {error}", file=sys.stderr)
        return 1
    print(plan.format_plan(out))
    if json_path:
        try:
            atomic.write_json(json_path, out, indent=2)
        except OSError as error:
            raise cli_errors.UsageError(
                f"--plan-json {json_path}: cannot write ({error.strerror or error}); "
                "the plan is printed above"
            ) from None
    return 0


def _help() -> str:
    values, _ = _define_flags(["train.py"])
    return (
        f"{__doc__.strip()}\n{values.get_help(include_special_flags=False)}\n"
        "  --config.FIELD=VALUE: overrides one field of the config, e.g. "
        "--config.train.steps=100\n"
    )


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _leave_at_once(signum, frame):
    # Start-up before the workdir is touched (imports, flags, the config, jax starting): nothing
    # to clean up, and a KeyboardInterrupt raised inside an import of jax's or at interpreter
    # exit crashed the process (a traceback or a segfault, depending on the moment).
    _exit(
        f"stopped by {signal.Signals(signum).name} while starting; nothing was written",
        128 + signum,
    )


def _unwind(signum, frame):
    # Once the workdir is in use: unwind through the `with` blocks (the lock released, any
    # temporary removed), then leave through _exit (main catches it). Where the exception is
    # swallowed (raised inside a __del__ or a callback), the training loop sees the signal as
    # pending and stops at its first step boundary instead.
    from tsld_jax import trainer

    trainer.PENDING_SIGNAL = signum
    raise _Stopped(signum)


class _Stopped(KeyboardInterrupt):
    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def _exit(line: str, code: int):
    """Prints `line` and exits at once: Python's own exit after an interrupted start-up waited
    for, or crashed in, XLA's and orbax's threads."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv) -> int:
    """The command line; see the module docstring. In-process callers (the tests) keep their
    own signal handlers; `__main__` installs train.py's first."""
    try:
        return _main(argv)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        line = (
            f"stopped by {signal.Signals(signum).name}; the workdir's checkpoints are as they "
            "were (run the same command again to go on)"
        )
        if not getattr(main, "own_signals", False):
            print(line, file=sys.stderr)
            return 128 + signum
        _exit(line, 128 + signum)


def _main(argv) -> int:
    from tsld_jax import cli_errors

    if any(arg in ("--help", "-help", "--helpfull", "-h") for arg in argv[1:]):
        # absl's --help belongs to absl.app.run, which train.py does not use (see _define_flags).
        print(_help())
        return 0
    try:
        values, config = cli_errors.parse_config_flags(argv, _define_flags)
        _check_plan_flags(values.plan, values["plan-json"].value)
    except cli_errors.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if values.plan is not None:
        with cli_errors.one_line_errors() as outcome:
            outcome.code = _plan(config, values.plan, values["plan-json"].value)
        return outcome.code
    from tsld_jax import multihost, trainer

    if values.multihost:
        with cli_errors.one_line_errors() as outcome:
            multihost.initialize(
                values.coordinator_address, values.num_processes, values.process_id
            )
        if outcome.code:
            return outcome.code
    from tsld_jax import workdir

    if getattr(main, "own_signals", False):
        # jax starts its backends (and plugins) first, still under _leave_at_once: it writes
        # nothing, and it catches and logs, with a traceback, whatever its plugin loading raises.
        import jax

        jax.devices()
        for sig in _SIGNALS:
            signal.signal(sig, _unwind)
    with cli_errors.one_line_errors(interrupts=False) as outcome:
        results = trainer.train_and_evaluate(config, values.workdir)
        if results.get("stopped"):
            # The shell's convention, so that `train.py && eval.py` does not go on.
            outcome.code = 128 + results["signal"]
    if isinstance(outcome.error, workdir.WriteFailure):
        # Exit 1: the machine (a full or read-only disk), not the user's input.
        # A save in flight when the workdir stopped taking writes leaves orbax threads waiting
        # (for minutes, until orbax's async timeout) for signals that never come, and Python's
        # exit would wait for them. Nothing they hold can land on this workdir: the checkpoints
        # that did are complete on disk, and the error line has named the last of them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return outcome.code


if __name__ == "__main__":
    for _sig in _SIGNALS:
        signal.signal(_sig, _leave_at_once)
    main.own_signals = True
    _hook = sys.unraisablehook
    # A _Stopped swallowed in a callback (jax's gc callback) is not lost: the loop stops on it.
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, _Stopped) else _hook(u)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv))

"""User mistakes become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys


class UsageError(ValueError):
    """A bad command line: flags, the config file, or a config override."""


@dataclasses.dataclass
class Outcome:
    code: int = 0
    error: BaseException | None = None  # the user error that set `code`, if one did


def user_error_types() -> tuple[type[BaseException], ...]:
    from tsld_jax import config_utils, multihost, trainer, workdir
    from tsld_jax.data.sources import DataError
    from tsld_jax.models.errors import LoadError
    from tsld_jax.models.spec import ConfigError

    return (
        config_utils.ConfigError,
        ConfigError,
        UsageError,
        LoadError,
        DataError,
        trainer.TrainingError,
        workdir.WorkdirError,
        multihost.MultihostError,
        FileNotFoundError,
    )


@contextlib.contextmanager
def one_line_errors(interrupts: bool = True):
    """Runs the body; a user error prints `error: ...` and sets the exit code to 2.

    Args:
      interrupts: also turn KeyboardInterrupt into `interrupted` and exit code 130; False lets
        it through (train.py reports signals itself).
    """
    outcome = Outcome()
    try:
        yield outcome
    except user_error_types() as error:
        print(f"error: {error}", file=sys.stderr)
        outcome.code = 2
        outcome.error = error
    except KeyboardInterrupt:
        if not interrupts:
            raise
        print("interrupted", file=sys.stderr)
        outcome.code = 130


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _config_path(argv) -> str | None:
    """The file of the --config flag as given (its `:arg` suffix dropped), or None."""
    for index, arg in enumerate(argv):
        if arg in ("--config", "-config") and index + 1 < len(argv):
            return argv[index + 1].split(":")[0]
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def parse_config_flags(argv, define_flags):
    """Defines the flags (`define_flags(argv) -> (FlagValues, config FlagHolder)`), parses
    `argv`, and returns (FlagValues, config); every mistake is one UsageError line.

    ml_collections reports a missing config file only when the config is first read (and then
    calls every `--config.x` override an unknown flag), a syntax error as the bare SyntaxError,
    and an exception in get_config() as a traceback in a flag error; here each becomes
    `--config PATH: ...`.
    """
    from absl import flags
    from ml_collections import ConfigDict

    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"--config {path}: the config file {what}")
    try:
        flag_values, config_flag = define_flags(argv)  # The default config is read here.
        flag_values(argv)
        config = config_flag.value
    except Exception as error:  # The config file is user code: anything may come out of it.
        root = error
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        if isinstance(error, flags.Error) and not str(error).startswith("flag --config="):
            raise UsageError(_first_line(error)) from None  # names the override and its value
        if isinstance(root, KeyError):  # an override names a field the config lacks
            field = str(root.args[0]).strip("'\"") if root.args else ""
            overrides = [a for a in argv if a.startswith("--config.") and f".{field}" in a]
            where = overrides[0] if overrides else f"--config {path}"
            raise UsageError(f"{where}: the config has no field {field!r}") from None
        if path is None:
            raise UsageError(f"{type(root).__name__}: {_first_line(root)}") from None
        if isinstance(root, SyntaxError):
            raise UsageError(
                f"--config {path}: syntax error at line {root.lineno}: {root.msg}"
            ) from None
        if isinstance(root, AttributeError) and "get_config" in str(root):
            raise UsageError(f"--config {path}: the file defines no get_config()") from None
        raise UsageError(f"--config {path}: {type(root).__name__}: {_first_line(root)}") from None
    if not isinstance(config, ConfigDict):
        raise UsageError(
            f"--config {path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return flag_values, config

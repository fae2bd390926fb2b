"""User mistakes become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import sys


@dataclasses.dataclass
class Outcome:
    code: int = 0


def user_error_types() -> tuple[type[BaseException], ...]:
    from tsld_jax import config_utils, trainer, workdir
    from tsld_jax.evaluation.perplexity import DataError
    from tsld_jax.models.errors import LoadError
    from tsld_jax.models.spec import ConfigError

    return (
        config_utils.ConfigError,
        ConfigError,
        LoadError,
        DataError,
        trainer.TrainingError,
        workdir.WorkdirError,
        FileNotFoundError,
    )


@contextlib.contextmanager
def one_line_errors():
    """Runs the body; a user error prints `error: ...` and sets the exit code to 2."""
    outcome = Outcome()
    try:
        yield outcome
    except user_error_types() as error:
        print(f"error: {error}", file=sys.stderr)
        outcome.code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        outcome.code = 130

"""Train: `python train.py --config configs/opt2.7b_tsld.py --workdir runs/opt2.7b`.

Without flags it runs the embedded default, ternary TSLD QAT of SmolLM2-135M on a CPU
(configs/smollm2_135m_tsld.py). `--config.a.b=v` overrides any field; a run resumes from the
newest checkpoint in its workdir by itself.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "configs", "smollm2_135m_tsld.py"
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, logs and exports go here.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (one process per host)."
)


def main(argv) -> int:
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    import jax

    from tsld_jax import cli_errors, trainer

    if _MULTIHOST.value:
        jax.distributed.initialize()  # Coordinator and process ids from the cluster environment.
    with cli_errors.one_line_errors() as outcome:
        trainer.train_and_evaluate(config, _WORKDIR.value)
    return outcome.code


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv))

"""Evaluate a model: `python eval.py --model PATH --task ptb --data-dir ../shared/data`."""

import sys

from tsld_jax.evaluation import cli

if __name__ == "__main__":
    sys.exit(cli.main())

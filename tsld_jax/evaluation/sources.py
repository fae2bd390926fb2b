"""The evaluation's view of its data: the file readers of `tsld_jax.data.sources` (data is read
in one place, for training and evaluation alike; evaluation imports from data, never the
reverse) and the harness's standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tsld_jax.data.sources import (
    DataError,
    hub_records,
    local_path,
    read_jsonl,
    read_lines,
    read_tsv,
)

__all__ = [
    "DataError",
    "hub_records",
    "local_path",
    "mean_stderr",
    "read_jsonl",
    "read_lines",
    "read_tsv",
]


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) deviation, as lm-evaluation-harness
    reports it; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance) / math.sqrt(n)

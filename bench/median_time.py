"""The one timer of the benchmarks: the median wall time of a call that waits for its results."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], repeats: int, *, warmup: int = 1) -> float:
    """Median seconds of `call()` over `repeats` runs, after `warmup` runs that are not timed
    (compilation, autotuning, first-touch allocation). `call` must block until its work is done
    (for JAX: `jax.block_until_ready` on what it returns)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

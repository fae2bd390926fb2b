"""Run logging: metrics.jsonl (one JSON object a line), TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR.

    In a multi-process run every process computes the same metrics; only process 0 writes them
    (otherwise each line would appear once per process).
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        import jax

        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._primary = jax.process_index() == 0
        if tensorboard and self._primary:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=workdir)
            except ImportError:  # TensorBoard output is optional; metrics.jsonl always exists.
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value) if not isinstance(value, str) else value
            record[key] = (
                value if not isinstance(value, float) or math.isfinite(value) else str(value)
            )
        if not self._primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self._tb.add_scalar(key, value, int(step))

    def hparams(self, config_dict: dict[str, Any]) -> None:
        if self._tb is not None:
            self._tb.add_text("config", "```\n" + json.dumps(config_dict, indent=2) + "\n```", 0)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
    )

"""What a finished run showed: its curves as a PNG in the workdir, and its closing lines."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tsld_jax import atomic

CURVES = "curves.png"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            points[r["step"]] = value  # a resumed run's repeated step: the newest value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def baselines(workdir: str) -> dict[str, float]:
    """The teacher's and round-to-nearest perplexities a run logged before its first step
    (metrics.jsonl keeps them across resumes; the resumed process does not recompute them)."""
    out = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key.startswith("baseline_") and isinstance(value, (int, float)):
                out[key.removeprefix("baseline_")] = value
    return out


def plot_curves(workdir: str, baselines: dict[str, float] | None = None) -> str | None:
    """Writes WORKDIR/curves.png: the training loss and the held-out perplexity against the
    step, with the teacher's and round-to-nearest's perplexities as reference lines. Returns the
    path, or None where the run logged nothing to plot."""
    records = read_metrics(workdir)
    loss_steps, loss = _series(records, "loss")
    gt_steps, gt = _series(records, "gt")
    ppl_steps, ppl = _series(records, "eval_ppl")
    if not loss and not ppl:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is opened
    import matplotlib.pyplot as plt

    baselines = baselines or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        left.plot(loss_steps, loss, label="training loss")
    if gt and gt != loss:
        left.plot(gt_steps, gt, label="ground-truth cross-entropy", alpha=0.8)
    left.set_xlabel("step")
    left.set_ylabel("nats")
    left.set_title("training")
    left.legend(fontsize=8)
    if ppl:
        right.plot(ppl_steps, ppl, marker="o", label="student (held out)")
    for key, label, style in (
        ("teacher_ppl", "teacher", "-"),
        ("ptq_ppl", "round-to-nearest", ":"),
    ):
        if key in baselines:
            right.axhline(baselines[key], color="black", linestyle=style, linewidth=1, label=label)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("perplexity")
    right.set_title("held-out perplexity")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, CURVES)
    try:
        # The format named: the temporary's name does not end in .png.
        with atomic.replacing(path) as temporary:
            fig.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def gap_closed(teacher_ppl: float, ptq_ppl: float, qat_ppl: float) -> float:
    """The share of the log-perplexity gap from round-to-nearest to the teacher that QAT closed
    (1: the teacher's perplexity; 0: no better than round-to-nearest; negative: worse)."""
    gap = math.log(ptq_ppl) - math.log(teacher_ppl)
    if gap <= 0:
        return float("nan")
    return (math.log(ptq_ppl) - math.log(qat_ppl)) / gap


def closing_lines(results: dict[str, Any], cfg, tokens: int) -> list[str]:
    """One or two lines that say what the run showed, and what would take it further."""
    if not {"teacher_ppl", "ptq_ppl", "qat_ppl"} <= set(results):
        return []
    teacher, ptq, qat = results["teacher_ppl"], results["ptq_ppl"], results["qat_ppl"]
    closed = gap_closed(teacher, ptq, qat)
    if math.isnan(closed):
        return [
            f"summary: round-to-nearest ({ptq:,.1f}) was no worse than the teacher "
            f"({teacher:,.1f}); QAT reached {qat:,.1f}"
        ]
    lines = [
        f"summary: {results['step']} steps ({tokens:,} tokens) of ternary QAT took held-out "
        f"perplexity from {ptq:,.1f} (round-to-nearest) to {qat:,.1f}, {qat / teacher:,.1f} "
        f"times the teacher's {teacher:,.1f} (closing {closed:.0%} of the log gap)"
    ]
    if closed < 0.9:
        lines.append(
            "summary: a short run, far from the teacher; the authors' recipe trains for epochs "
            "(e.g. --config.train.epochs=30 --config.train.steps=0 on PTB with "
            "--config.data.dir=../shared/data, on a GPU); docs/results has longer runs"
        )
    return lines

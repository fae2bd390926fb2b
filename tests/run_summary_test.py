"""run_summary: the gap a run closed, its closing lines, and the curves PNG."""

import json
import math

import ml_collections
import pytest

from tsld_jax import run_summary


def test_gap_closed_is_the_log_perplexity_share():
    # ptq 1000, teacher 10: a student at 100 is halfway in log space.
    assert run_summary.gap_closed(10.0, 1000.0, 100.0) == pytest.approx(0.5)
    assert run_summary.gap_closed(10.0, 1000.0, 10.0) == pytest.approx(1.0)
    assert run_summary.gap_closed(10.0, 1000.0, 2000.0) < 0
    assert math.isnan(run_summary.gap_closed(10.0, 5.0, 7.0))  # no gap to close


def test_closing_lines_say_what_the_run_showed():
    cfg = ml_collections.ConfigDict()
    results = {"teacher_ppl": 35.4, "ptq_ppl": 1.39e6, "qat_ppl": 688.0, "step": 120}
    lines = run_summary.closing_lines(results, cfg, 120 * 512)
    closed = (math.log(1.39e6) - math.log(688.0)) / (math.log(1.39e6) - math.log(35.4))
    assert f"closing {closed:.0%}" in lines[0]
    # The ratio to the teacher leads: a log-gap share from a baseline in the millions flatters.
    assert f"to 688.0, {688.0 / 35.4:.1f} times the teacher's 35.4 (closing" in lines[0]
    assert "1,390,000.0 (round-to-nearest) to 688.0" in lines[0] and "61,440 tokens" in lines[0]
    assert "the authors' recipe" in lines[1]
    done = run_summary.closing_lines(results | {"qat_ppl": 36.0}, cfg, 1)
    assert len(done) == 1  # near the teacher: no advice
    assert run_summary.closing_lines({"ppl": 3.0, "step": 1}, cfg, 1) == []  # an FP run
    flat = {"teacher_ppl": 9.0, "ptq_ppl": 8.0, "qat_ppl": 8.5, "step": 1}
    assert run_summary.closing_lines(flat, cfg, 1) == [
        "summary: round-to-nearest (8.0) was no worse than the teacher (9.0); QAT reached 8.5"
    ]


def test_plot_curves_writes_a_png_and_reads_baselines(tmp_path):
    assert run_summary.plot_curves(str(tmp_path)) is None  # nothing logged yet
    records = [
        {"step": 0, "baseline_teacher_ppl": 30.0, "baseline_ptq_ppl": 9000.0},
        {"step": 1, "loss": 5.0, "gt": 4.0},
        {"step": 2, "loss": 4.0, "gt": 3.5},
        {"step": 2, "eval_ppl": 400.0},
        {"step": 2, "loss": "nan"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert run_summary.baselines(str(tmp_path)) == {"teacher_ppl": 30.0, "ptq_ppl": 9000.0}
    path = run_summary.plot_curves(str(tmp_path), run_summary.baselines(str(tmp_path)))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

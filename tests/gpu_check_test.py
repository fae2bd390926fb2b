"""bench/gpu_check.sh's benchmark stages run in its CPU dry-run mode, so that a GPU window (15
minutes, lent by chance) is not lost to a benchmark script that no longer runs. The pytest
stage runs tests that the suite runs anyway, and train.py's smoke run is train_test's."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("kernels", "train_step", "attention_step", "packed_forward")


@pytest.mark.slow
def test_benchmark_stages_run_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "GPU_CHECK_CPU": "1",
        "GPU_CHECK_STAGES": " ".join(STAGES),
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    log = (tmp_path / "gpu_check.log").read_text()
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [
        (name, "passed") for name in STAGES
    ], log[-3000:]
    formats = {row["format"] for row in report["kernels"]["rows"]}
    assert formats == {"bf16", "w2a16", "w4a16", "w8a16"}
    assert report["train_step"]["results"]["jax"]["seconds"] > 0
    assert report["train_step"]["failures"] == {}
    attention = report["attention_step"]
    assert attention["failures"] == {}
    assert set(attention["results"]) == {"jax attention=xla", "jax attention=pallas_interpret"}
    assert attention["attention_speedup"]["pallas_interpret"] > 0
    assert [r["shape"] for r in report["packed_forward"]["rows"]] == ["prefill", "decode"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Kernels" in markdown and "## Packed forward" in markdown
    assert "## Fused attention step" in markdown

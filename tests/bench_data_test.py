"""bench/data.py on a tiny corpus: it runs end to end and its record holds what docs/benchmarks.md
reads (the step estimate by the issue's arithmetic, the corpus it wrote, the loader's pass)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_data") / "data.json"
    argv = ["--corpus-gb", "0.004", "--prepare-mb", "0.1", "--tokenizer", "random"]
    argv += ["--block-size", "64", "--batch-size", "8", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "data.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_the_step_estimate_is_the_issues_arithmetic(record):
    # LLaMA-7B: 8N (student forward + backward, teacher forward) + 12 x 32 layers x 4096 x 512.
    flop = 8 * 6.74e9 + 12 * 32 * 4096 * 512
    assert record["step"]["flop_per_token"] == pytest.approx(flop)
    assert record["step"]["step_tokens_per_s"] == pytest.approx(8 * 312e12 * 0.4 / flop)
    assert 18_000 < record["step"]["step_tokens_per_s"] < 18_500


def test_the_record_says_where_it_came_from(record):
    for key in ("command", "commit", "date", "machine"):
        assert record[key], key
    assert record["command"].startswith("python bench/data.py --corpus-gb 0.004")


def test_corpus_and_pass_add_up(record):
    corpus, loader = record["corpus"], record["loader"]
    # 0.004 GiB of token ids (the random model's vocabulary fits 16-bit ids), all written.
    assert corpus["tokens"] == int(0.004 * 2**30) // 2
    assert corpus["gb_on_disk"] >= 0.004
    # One shard, cut into whole blocks of 64 tokens.
    assert loader["blocks"] == corpus["tokens"] // 64
    assert loader["batch"] == "8 x 64" and loader["tokens_per_s"] > 0
    assert loader["rss_samples"] >= 2 and len(loader["rss_anon_mb_first_last_max"]) == 3
    # The same text gives the same tokens with one worker and with two, threads on and off.
    runs = [(r["tokenizer_threads"], r["workers"]) for r in record["prepare"]]
    assert runs == [(True, 1), (True, 2), (False, 1), (False, 2)]
    assert len({r["tokens"] for r in record["prepare"]}) == 1 and record["prepare"][0]["tokens"]

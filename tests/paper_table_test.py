"""experiments/paper_table.py on a tiny table: rows recorded with their config, never
recomputed, the report written, a teacher lost with the runs rebuilt and checked against its
record; the small model's builder gives a loadable word-level model."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_test  # noqa: E402

from experiments import paper_table, ptb_word_model  # noqa: E402


def test_word_model_covers_ptb_and_ends_lines_with_eos(tmp_path, shared_data):
    from tsld_jax.models import load_model

    directory = ptb_word_model.build(
        str(tmp_path / "m"), str(shared_data), hidden=16, layers=1, heads=2, positions=32
    )
    model = load_model(directory)
    vocabulary = ptb_word_model.ptb_vocabulary(str(shared_data))
    assert model.spec.vocab_size == len(vocabulary) == 10000  # PTB's 10k words with <unk>, + <eos>
    ids = model.tokenizer("the <unk> said")["input_ids"]
    assert ids == [vocabulary.index(w) for w in ("the", "<unk>", "said", "<eos>")]
    valid = (shared_data / "ptb" / "ptb.valid.txt").read_text().split()
    assert set(valid) <= set(vocabulary)  # the closed vocabulary: no word of valid is unknown
    assert model.spec.family == "gpt2" and model.spec.position_limit == 32


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory, shared_data):
    import tiny_models

    base = tmp_path_factory.mktemp("paper_table")
    model_dir = base / "model"
    tiny_models.save("llama_tied", str(model_dir))
    words = (shared_data / "ptb" / "ptb.train.txt").read_text().split()[:2000]
    tiny_models.save_word_tokenizer(str(model_dir), sorted(set(words))[: tiny_models.VOCAB - 1])
    table = paper_table.Table(
        name="tiny", title="a tiny test table", student=str(model_dir), block_size=32,
        batch_size=4, fp_epochs=0.0005, fp_lr=1e-3, fp_warmup=0, qat_epochs=0.0005,
        qat_lr=1e-3, qat_warmup=0, seeds=(0,), losses=("tsld",), eval_blocks=4,
        eval_batch=4, final_blocks=16,
    )  # fmt: skip
    return table, base


def _train_here(monkeypatch, base):
    monkeypatch.setattr(paper_table, "RESULTS", str(base / "results"))
    # train.py runs inherit the environment: one device (not conftest's 8), the tests' cache.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", train_test.CACHE)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.mark.slow  # train.py end to end, twice (as train_test's runs; .ci/py312 skips them)
def test_rows_are_recorded_and_never_recomputed(tiny_table, shared_data, monkeypatch):
    table, base = tiny_table
    _train_here(monkeypatch, base)
    results = paper_table.run_table(table, str(shared_data), str(base / "runs"), None)
    assert list(results["rows"]) == ["fp", "ptq", "tsld_s0"]
    steps = results["rows"]["tsld_s0"]["steps"]
    assert steps == round(0.0005 * (results["train_blocks"] // 4)) and steps >= 2
    for row in ("fp", "tsld_s0"):
        record = results["rows"][row]
        assert record["wall_s"] > 0 and record["machine"]["cores"] and record["train_py"]
        assert np.isfinite([record["validation"], record["test"]]).all()
        assert record["curve"] and record["curve"][-1][0] == record["steps"] * 4 * 32
    assert "--config.loss.kind=tsld" in results["rows"]["tsld_s0"]["train_py"]
    # Round-to-nearest ternary changes the teacher (its own row, not a copy of fp's).
    assert results["rows"]["ptq"]["validation"] != pytest.approx(
        results["rows"]["fp"]["validation"]
    )
    # The analysis of the students it has (tsld here): one value per position of the block.
    positions = results["positions"]["tsld_s0"]
    assert len(positions["kl"]) == 32 and min(positions["kl"]) >= 0
    assert all(0 <= a <= 1 for a in positions["agreement"])
    # The tsld student's checkpoint, evaluated again, gives the recorded perplexity.
    from tsld_jax import checkpoint

    run = checkpoint.restore_for_eval(str(base / "runs" / "tiny" / "tsld_s0"))
    again = paper_table.split_ppl(
        run["params"], run["spec"], run["tokenizer"], table, str(shared_data), run["quantizer"]
    )
    assert again["validation"] == pytest.approx(results["rows"]["tsld_s0"]["validation"])

    stored = json.load(open(base / "results" / "tiny.json"))
    assert stored["rows"].keys() == results["rows"].keys()
    markdown = (base / "results" / "tiny.md").read_text()
    assert "| tsld_s0 | tsld | 0 |" in markdown and "Error along the sequence" in markdown
    assert "over the first 16 blocks of each split" in markdown
    assert (base / "results" / "tiny_curves.png").exists()
    assert (base / "results" / "tiny_positions.png").exists()

    def no_training(*args):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(paper_table, "train_row", no_training)
    again = paper_table.run_table(table, str(shared_data), str(base / "runs"), None)
    assert again["rows"] == stored["rows"]

    # A new checkout has the JSON but not the runs: a row still to run needs the teacher, which
    # is trained again from the fp row's recorded config and must give its perplexities; here
    # the record is altered, so the rebuilt teacher must be refused (and kept as a re-run).
    import shutil

    monkeypatch.undo()  # train_row again
    _train_here(monkeypatch, base)
    shutil.rmtree(base / "runs" / "tiny" / "fp")
    stored["rows"]["fp"]["validation"] *= 1.01
    json.dump(stored, open(base / "results" / "tiny.json", "w"))
    bigger = dataclasses.replace(table, losses=("tsld", "gt"))
    with pytest.raises(SystemExit, match="rebuilt teacher's validation perplexity"):
        paper_table.run_table(bigger, str(shared_data), str(base / "runs"), ["gt_s0"])
    rebuilt = json.load(open(base / "results" / "tiny.json"))["reruns"]["fp"]
    assert rebuilt["validation"] == pytest.approx(results["rows"]["fp"]["validation"], rel=1e-6)
    assert rebuilt["test"] == pytest.approx(results["rows"]["fp"]["test"], rel=1e-6)
    assert (base / "runs" / "tiny" / "fp" / "export").is_dir()


def test_a_larger_table_keeps_its_rows_apart(tiny_table):
    table, _ = tiny_table
    bigger = dataclasses.replace(table, seeds=(0, 1))
    overrides = paper_table.row_overrides(
        bigger, "tsld_s1", "/data", {"init": "i", "teacher": "t"}, 4000
    )
    assert "--config.seed=1" in overrides and "--config.model.name_or_path=t" in overrides
    assert "--config.train.steps=1" in overrides  # 0.0005 epochs of 1000 batches, rounded up to 1


def test_the_converged_table_stops_its_teacher_early_and_its_qat_rows_match_ptb_small():
    table = paper_table.TABLES["ptb_small_converged"]
    paths = {"init": "i", "teacher": "t"}
    fp = paper_table.row_overrides(table, "fp", "/data", paths, 7266)
    assert "--config.eval.patience=4" in fp and "--config.eval.every_steps=226" in fp
    small = paper_table.TABLES["ptb_small"]
    assert "--config.eval.patience=4" not in paper_table.row_overrides(
        small, "fp", "/data", paths, 7266
    )
    # Only the teacher and the evaluation blocks differ: the QAT rows train alike.
    for row in ("tsld_s0", "l2l_s1"):
        converged = paper_table.row_overrides(table, row, "/data", paths, 7266)
        same = paper_table.row_overrides(small, row, "/data", paths, 7266)
        differ = sorted(set(converged) ^ set(same))
        assert differ == ["--config.data.eval_blocks=256", "--config.data.eval_blocks=64"]


def test_welch_interval_against_the_formula():
    a = [145.1, 145.3, 144.9, 145.6, 145.0]
    b = [142.2, 142.6, 142.3, 142.5, 142.1]
    difference, low, high = paper_table.welch_interval(a, b)
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 5
    se = np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 4)  # Welch-Satterthwaite
    assert 7 < df < 8  # t(0.975) lies between 2.365 (7 df) and 2.306 (8 df): printed tables
    assert difference == pytest.approx(np.mean(a) - np.mean(b))
    half = (high - low) / 2
    assert (low + high) / 2 == pytest.approx(difference)
    assert 2.306 * se < half < 2.365 * se
    equal = paper_table.welch_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert equal[0] == 0 and equal[1] < 0 < equal[2]


def test_the_report_gives_standard_deviations_and_intervals_from_three_seeds():
    rows = {}
    for seed, (t, g) in enumerate([(145.0, 142.0), (145.4, 142.6), (144.8, 142.2)]):
        for loss, value in (("tsld", t), ("logit_gt", g)):
            rows[f"{loss}_s{seed}"] = {
                "validation": value,
                "test": value - 8,
                "wall_s": 60.0,
                "machine": {},
            }
    table = dataclasses.asdict(paper_table.TABLES["ptb_small_converged"])
    table["seeds"], table["losses"] = (0, 1, 2), ("logit_gt", "tsld")
    markdown = paper_table.markdown({"table": table, "rows": rows})
    assert "Over seeds (mean ± standard deviation):" in markdown
    assert f"| tsld | 3 | 145.07 ± {np.std([145.0, 145.4, 144.8], ddof=1):.2f} |" in markdown
    difference, low, high = paper_table.welch_interval([145.0, 145.4, 144.8], [142.0, 142.6, 142.2])
    assert f"| tsld - logit_gt | 3, 3 | {difference:+.2f} [{low:+.2f}, {high:+.2f}] |" in markdown
    assert "stopped after 4 evaluations without a lower one" in markdown
    two = dict(table, seeds=(0, 1))
    assert "mean ± half the range" in paper_table.markdown({"table": two, "rows": rows})


def test_llama_cpp_check_scores_tokens_as_the_training_loss_does():
    import jax.numpy as jnp

    from experiments import llama_cpp_check
    from tsld_jax import losses

    rng = np.random.default_rng(0)
    logits_TxV = rng.normal(size=(12, 50)).astype(np.float32) * 3
    tokens_T = rng.integers(0, 50, size=12)
    nll = llama_cpp_check.next_token_nll(logits_TxV, tokens_T)
    # losses.gt: the mean next-token cross-entropy of the student's logits for positions 0..T-2
    expected = losses.gt(jnp.asarray(logits_TxV[None, :-1]), jnp.asarray(tokens_T[None, 1:]))
    assert nll.shape == (11,) and float(nll.mean()) == pytest.approx(float(expected), rel=1e-5)

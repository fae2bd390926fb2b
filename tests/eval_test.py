"""eval.py end to end on a tiny model: several tasks in one run, PTQ, checkpoint restore, and
one-line errors for bad input."""

import collections
import json
import os
import subprocess
import sys

import pytest
import tiny_models
import train_test

from tsld_jax.evaluation import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, shared_data):
    directory = tmp_path_factory.mktemp("gpt2_eval")
    tiny_models.save("gpt2", str(directory))
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text().split()[:20000]
    words = [w for w, _ in collections.Counter(text).most_common(tiny_models.VOCAB - 1)]
    tiny_models.save_word_tokenizer(str(directory), words)
    return str(directory)


def test_several_tasks_in_one_run(tiny_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    tasks = "arc_easy,piqa,sst2,gsm8k,ptb"
    code = cli.main(
        [
            "--model",
            tiny_dir,
            "--task",
            tasks,
            "--data-dir",
            str(shared_data),
            "--limit",
            "3",
            "--max-gen-toks",
            "3",
            "--block-size",
            "16",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    results = {r["task"]: r for r in payload["results"]}
    assert list(results) == tasks.split(",") and payload["model"] == tiny_dir
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} <= set(results["arc_easy"])
    assert results["arc_easy"]["split"] == "test" and results["piqa"]["split"] == "validation"
    assert "acc_norm" not in results["sst2"]  # the harness reports acc only for SST-2
    assert {"exact_match_strict", "exact_match_flexible"} <= set(results["gsm8k"])
    assert results["gsm8k"]["num_fewshot"] == 5 and results["ptb"]["blocks"] == 3
    assert all(r["n"] == 3 for r in payload["results"] if "n" in r)
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.splitlines()[0].split() == ["task", "split", "metric", "value", "stderr", "n"]
    assert any(
        line.split()[:3] == ["gsm8k", "test", "exact_match_flexible"] for line in table.splitlines()
    )


def test_post_training_quantization(tiny_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = [
        "--model",
        tiny_dir,
        "--task",
        "ptb",
        "--data-dir",
        str(shared_data),
        "--block-size",
        "16",
        "--max-blocks",
        "2",
        "--quiet",
    ]
    assert cli.main([*args, "--output", str(out)]) == 0
    float_ppl = json.loads(out.read_text())["ppl"]
    assert cli.main([*args, "--quant", "sym8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"].endswith("+sym8")
    assert result["ppl"] != float_ppl and abs(result["ppl"] / float_ppl - 1) < 0.05
    # 4-bit groups of 128 do not fit the tiny model's 32 features: a one-line error.
    capsys.readouterr()
    assert cli.main([*args, "--quant", "asym4"]) == 2
    assert capsys.readouterr().err.startswith("error: --quant asym4:")


def test_packed_model_matches_fake_quantization(tiny_dir, shared_data, tmp_path):
    from tsld_jax import quant
    from tsld_jax.models import load_model
    from tsld_jax.quant import export

    loaded = load_model(tiny_dir, load_tokenizer=False)
    path = str(tmp_path / "packed.safetensors")
    packed = export.export_packed(loaded.params, quant.preset_rules("twn"))
    export.save_packed(path, packed, loaded.spec)
    args = [
        "--task",
        "ptb",
        "--data-dir",
        str(shared_data),
        "--block-size",
        "16",
        "--max-blocks",
        "2",
        "--quiet",
    ]
    out_packed, out_fake = tmp_path / "packed.json", tmp_path / "fake.json"
    assert (
        cli.main(["--packed", path, "--tokenizer", tiny_dir, *args, "--output", str(out_packed)])
        == 0
    )
    assert cli.main(["--model", tiny_dir, "--quant", "twn", *args, "--output", str(out_fake)]) == 0
    packed_ppl = json.loads(out_packed.read_text())["ppl"]
    assert packed_ppl == pytest.approx(json.loads(out_fake.read_text())["ppl"], rel=1e-4)


def _bad_arc(data_dir):
    path = data_dir / "arc" / "ARC-Easy-Test.jsonl"
    path.parent.mkdir(parents=True)
    good = {
        "id": "1",
        "question": {"stem": "a", "choices": [{"text": "b", "label": "A"}]},
        "answerKey": "A",
    }
    path.write_text(json.dumps(good) + "\n{not json\n")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_task", "unknown task 'arc_hard'"),
        ("missing_data", "cannot read"),
        ("malformed_jsonl", "ARC-Easy-Test.jsonl:2: malformed JSON"),
        ("limit_0", "--limit must be at least 1"),
        ("step_without_checkpoint", "--step needs --checkpoint"),
        ("packed_without_tokenizer", "--packed needs --tokenizer"),
    ],
)
def test_bad_input_is_one_line_error(case, expected, tiny_dir, tmp_path, capsys):
    task, limit = "arc_easy", "2"
    if case == "unknown_task":
        task = "arc_easy,arc_hard"
    elif case == "malformed_jsonl":
        _bad_arc(tmp_path)
    elif case == "limit_0":
        limit = "0"
    source = ["--packed", "x.safetensors"] if case.startswith("packed") else ["--model", tiny_dir]
    args = [*source, "--task", task, "--data-dir", str(tmp_path), "--limit", limit]
    if case == "step_without_checkpoint":
        args += ["--step", "3"]
    assert cli.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    _bad_arc(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            str(tmp_path / "none"),
            "--task",
            "arc_easy",
            "--limit",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --limit must be at least 1, got 0"


def test_checkpoint_restore_gives_the_training_runs_last_perplexity(tmp_path, shared_data):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    train = subprocess.run(
        train_test._command(
            workdir,
            shared_data,
            "--config.train.steps=2",
            "--config.checkpoint.every_steps=2",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1"},  # the platform: conftest's
    )
    assert train.returncode == 0, train.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    out = tmp_path / "ppl.json"
    code = cli.main(
        [
            "--checkpoint",
            str(workdir),
            "--task",
            "ptb",
            "--data-dir",
            str(shared_data),
            "--block-size",
            str(config["data"]["block_size"]),
            "--max-blocks",
            str(config["data"]["eval_blocks"]),
            "--batch-size",
            str(config["eval"]["batch_size"]),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["train_last_eval"]["step"] == 2
    assert result["ppl"] == pytest.approx(result["train_last_eval"]["eval_ppl"], rel=1e-5)
    assert result["model"].endswith("@2")
    # The ternary student also answers questions (its byte tokenizer, its quantizer).
    out = tmp_path / "tasks.json"
    code = cli.main(
        [
            "--checkpoint",
            str(workdir),
            "--task",
            "arc_easy,gsm8k",
            "--data-dir",
            str(shared_data),
            "--limit",
            "1",
            "--max-gen-toks",
            "2",
            "--max-length",
            "256",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert [r["n"] for r in json.loads(out.read_text())["results"]] == [1, 1]

"""The perplexity protocol against an independent numpy/torch computation, and eval.py errors."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_models

from tsld_jax.evaluation import cli, perplexity
from tsld_jax.models import named

torch = pytest.importorskip("torch")  # the reference is a PyTorch model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 16


@pytest.fixture(scope="module")
def ptb_lines(shared_data):
    return (shared_data / "ptb" / "ptb.valid.txt").read_text().splitlines()[:60]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, ptb_lines):
    directory = tmp_path_factory.mktemp("gpt2_words")
    model = tiny_models.build("gpt2", str(directory))
    counts = collections.Counter(w for line in ptb_lines for w in line.split() if w != "<unk>")
    words = [w for w, _ in counts.most_common(tiny_models.VOCAB - 1)]
    tiny_models.save_word_tokenizer(str(directory), words)
    return str(directory), model, ["<unk>", *words]


def _reference_ppl(model, vocab, lines, block, max_blocks):
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, 0) for line in lines for w in line.strip().split()]
    n = len(ids) // block
    blocks = torch.tensor(ids[: n * block]).reshape(n, block)[:max_blocks]
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, blocks[:, 1:, None])[..., 0]
    return float(np.exp(nll.mean(dim=1).mean().item())), int(blocks.numel())


def test_perplexity_matches_independent_reference(tiny_dir, shared_data, tmp_path, ptb_lines):
    directory, model, vocab = tiny_dir
    out = tmp_path / "results.json"
    code = cli.main(
        [
            "--model",
            directory,
            "--task",
            "ptb",
            "--data-dir",
            str(shared_data),
            "--block-size",
            str(BLOCK),
            "--max-blocks",
            "7",
            "--batch-size",
            "3",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    lines = (shared_data / "ptb" / "ptb.valid.txt").read_text().splitlines()
    expected, tokens = _reference_ppl(model, vocab, lines, BLOCK, 7)
    assert result["blocks"] == 7 and result["tokens"] == tokens == 7 * BLOCK
    assert {"task", "split", "ppl", "tokens", "blocks", "model"} <= set(result)
    np.testing.assert_allclose(result["ppl"], expected, rtol=1e-5)


def test_blocks_drop_the_remainder():
    class Tok:
        def __call__(self, lines):
            return {"input_ids": [[len(line)] * len(line) for line in lines]}

    blocks = perplexity.tokenize_blocks(["  ab ", "cde", ""], Tok(), 2)
    np.testing.assert_array_equal(blocks, [[2, 2], [3, 3]])  # stripped, concatenated, cut


def test_too_little_data_is_a_clear_error():
    class Tok:
        def __call__(self, lines):
            return {"input_ids": [[1] for _ in lines]}

    with pytest.raises(perplexity.DataError, match="less than one block"):
        perplexity.tokenize_blocks(["a"], Tok(), 4)


def _run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def _write_truncated_safetensors(directory, source_dir):
    import shutil

    shutil.copy(os.path.join(source_dir, "config.json"), directory)
    data = open(os.path.join(source_dir, "model.safetensors"), "rb").read()
    open(os.path.join(directory, "model.safetensors"), "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "no_config",
        "truncated_safetensors",
        "truncated_gguf",
        "unknown_arch",
        "missing_data",
        "hub_offline",
    ],
)
def test_bad_input_is_one_line_error(case, tmp_path, tiny_dir, shared_data):
    directory, _, _ = tiny_dir
    model, data = str(tmp_path / "nope"), str(shared_data)
    if case == "no_config":
        model = str(tmp_path)
    elif case == "truncated_safetensors":
        _write_truncated_safetensors(tmp_path, directory)
        model = str(tmp_path)
    elif case == "truncated_gguf":
        from conftest import smollm2_gguf_path

        model = str(tmp_path / "model.gguf")
        with open(smollm2_gguf_path(), "rb") as f:
            open(model, "wb").write(f.read(3_000_000))  # header intact, tensor data cut
    elif case == "unknown_arch":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        model = str(tmp_path)
    elif case == "missing_data":
        model, data = directory, str(tmp_path)
    elif case == "hub_offline":
        model = "some-org/some-model"
    result = _run_cli(
        "--model", model, "--task", "ptb", "--data-dir", data, "--block-size", "32", "--quiet"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    expected = {
        "missing": "does not exist",
        "no_config": "no config.json",
        "truncated_safetensors": "unreadable safetensors",
        "truncated_gguf": "unreadable GGUF",
        "unknown_arch": "unknown architecture",
        "missing_data": "cannot read",
        "hub_offline": "HF_HUB_OFFLINE",
    }[case]
    assert expected in error_lines[0]


def test_unknown_task_exits_2():
    assert cli.main(["--model", "x", "--task", "nonsense"]) == 2


def _bos_word_tokenizer():
    """Words and punctuation as tokens, a BOS added to each call, and "<unk>" a special token."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<bos>": 1, "<": 2, "unk": 3, ">": 4, "a": 5, "b": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>"
    )


def test_bos_per_line_or_per_block():
    tokenizer = _bos_word_tokenizer()
    lines = [" a <unk> b ", "b a", "a b"]
    # The authors' protocol: each line as the tokenizer has it (BOS first, "<unk>" special).
    line = perplexity.tokenize_blocks(lines, tokenizer, 5)
    np.testing.assert_array_equal(line, [[1, 5, 0, 6, 1], [6, 5, 1, 5, 6]])
    # Gemma's: plain text ("<unk>" spelled out), one BOS opening each block of 1 + 3 tokens.
    block = perplexity.tokenize_blocks(lines, tokenizer, 4, bos="block")
    np.testing.assert_array_equal(block, [[1, 5, 2, 3], [1, 4, 6, 6], [1, 5, 5, 6]])
    with pytest.raises(perplexity.DataError, match="needs a tokenizer with a BOS"):
        perplexity.tokenize_blocks(lines, named.ByteTokenizer(), 4, bos="block")

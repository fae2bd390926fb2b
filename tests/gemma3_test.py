"""The real Gemma-3-270M (the `gemma3-270m` GGUF, Q4_K_M) against llama.cpp and transformers.

- `eval.py --model gemma3-270m` on PTB equals llama.cpp's own run of the same file on the same
  token ids: perplexity within 1% (llama.cpp rounds activations to 8 bits in its k-quant dot
  products; we compute in float32 from the dequantized weights, as gguf-py dequantizes them);
- our float export of the model (gguf-f32) runs in llama.cpp with our logits and top-1;
- save_hf writes a directory transformers loads with our logits.

The protocol (docs/gemma3_gguf.md): `--bos block`, one BOS opening each block and PTB's lines as
plain text, because Gemma is trained with a BOS at the start of every sequence and never saw its
special <unk> token, which the tokenizer's default parsing would put where PTB writes "<unk>".
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tsld_jax.evaluation import perplexity
from tsld_jax.models import decoder, load_model, named

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS, BLOCK_SIZE = 4, 512


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def ptb_blocks(gemma3, shared_data):
    lines = perplexity.load_lines("ptb", "validation", str(shared_data))
    return perplexity.tokenize_blocks(lines, gemma3.tokenizer, BLOCK_SIZE, bos="block")[:BLOCKS]


def _llama_cpp_logits(llama_cpp, path, row):
    # export_gguf_test's llama.cpp run (a float32 KV cache and no flash attention: llama.cpp's
    # float16 defaults add their own rounding, 1056 against 1041 on 4 x 256 tokens), one row.
    from tests.export_gguf_test import llama_cpp_logits

    return np.asarray(llama_cpp_logits(llama_cpp, path, row, BLOCK_SIZE)[0], np.float64)


def _block_losses(logits_BxTxV, rows_BxT):
    shifted = logits_BxTxV - logits_BxTxV.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs[:, :-1], rows_BxT[:, 1:, None], -1)[..., 0]
    return -picked.mean(-1)


def test_eval_py_ptb_equals_llama_cpp_on_the_same_tokens(gemma3, llama_cpp, ptb_blocks, tmp_path):
    output = tmp_path / "ppl.json"
    command = [sys.executable, "eval.py", "--model", "gemma3-270m", "--task", "ptb"]
    command += ["--data-dir", os.environ.get("TSLD_SHARED_DATA", "../shared/data")]
    command += ["--max-blocks", str(BLOCKS), "--bos", "block", "--quiet", "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    result = json.loads(output.read_text())
    assert (result["bos"], result["blocks"], result["block_size"]) == ("block", BLOCKS, BLOCK_SIZE)
    ours = result["ppl"]
    # One block at a time: Gemma's 262,144-entry vocabulary makes a block's float64 logits 1 GB,
    # and the four blocks' logits with their log-softmax copies took the process to 14 GB.
    forward = jax.jit(lambda params, tokens: decoder.forward(params, tokens, gemma3.spec))
    our_losses, their_losses, agreements = [], [], []
    for row in ptb_blocks:
        theirs = _llama_cpp_logits(llama_cpp, named.path("gemma3-270m"), row)[None]
        logits = np.asarray(forward(gemma3.params, row[None]), np.float64)
        their_losses.append(_block_losses(theirs, row[None])[0])
        our_losses.append(_block_losses(logits, row[None])[0])
        agreements.append(np.mean(logits.argmax(-1) == theirs.argmax(-1)))
        del theirs, logits
    reference = float(np.exp(np.mean(their_losses)))
    agreement = float(np.mean(agreements))
    print(f"gemma3-270m PTB: ours {ours:.2f}, llama.cpp {reference:.2f}, top-1 {agreement:.3f}")
    assert ours == pytest.approx(float(np.exp(np.mean(our_losses))), 1e-4)
    assert ours == pytest.approx(reference, rel=0.01)
    assert agreement >= 0.9


def test_our_float_export_runs_in_llama_cpp_with_our_logits(
    gemma3, llama_cpp, ptb_blocks, tmp_path
):
    """With the weights in float (our gguf-f32 export of the dequantized model) llama.cpp's
    matmuls no longer round the activations: its logits and top-1 are ours, which puts the 1%
    above on llama.cpp's k-quant arithmetic, not on the model."""
    from tsld_jax import export_cli

    path = str(tmp_path / "gemma3-f32.gguf")
    export_cli.export(export_cli.model_source("gemma3-270m", None), "gguf-f32", path)
    rows = ptb_blocks[:1, :128]
    theirs = _llama_cpp_logits(llama_cpp, path, rows[0])[None]
    ours = np.asarray(decoder.forward(gemma3.params, rows, gemma3.spec), np.float64)
    relative = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    agreement = float(np.mean(theirs.argmax(-1) == ours.argmax(-1)))
    print(f"gemma3-270m f32 export in llama.cpp: {relative:.2e} of the largest logit, {agreement}")
    assert relative < 1e-3
    assert agreement >= 0.98


def test_save_hf_loads_in_transformers_with_our_logits(gemma3, ptb_blocks, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from tsld_jax.models import save_hf

    save_hf(str(tmp_path), gemma3.params, gemma3.spec, gemma3.hf_config)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    rows = ptb_blocks[:1, :64]
    with torch.no_grad():
        theirs = model(torch.tensor(rows, dtype=torch.long)).logits.numpy()
    ours = np.asarray(decoder.forward(gemma3.params, rows, gemma3.spec))
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max(), rtol=0)

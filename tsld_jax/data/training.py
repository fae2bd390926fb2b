"""What the trainer reads: the training batches and the held-out examples a `config.data` names,
from memory (`examples`) or from token shards (`shards`)."""

from __future__ import annotations

import sys
from typing import Any

from tsld_jax.data import examples, shards


def train_batches(
    cfg, seed: int, tokenizer: Any, vocab_size: int, teacher=None, workdir=None, progress=True
):
    """The training iterator: `shards.ShardBatches` (this process's rows) for name "shards",
    else `examples.BatchIterator` over the loaded examples (the global batch). Both have
    `state()`/`restore()`, saved with every checkpoint."""
    if examples.resolve_name(cfg) == "shards":
        return shards.batches(cfg, tokenizer, vocab_size, seed)
    train = examples.load_examples(cfg, tokenizer, "train", teacher, workdir, progress=progress)
    return examples.BatchIterator(train, cfg.batch_size, seed)


def eval_examples(
    cfg, tokenizer: Any, vocab_size: int, teacher=None, workdir=None, progress=True
) -> examples.Examples:
    """The held-out examples (the first `cfg.eval_blocks`; 0: all) for the perplexity."""
    count = cfg.eval_blocks
    # With data.document_attention, held-out blocks are scored as training reads them.
    segments = cfg.get("document_attention", False)
    if cfg.get("eval_path", ""):
        return shards.eval_examples(
            cfg.eval_path, cfg.block_size, count, tokenizer, vocab_size, segments
        )
    if examples.resolve_name(cfg) == "shards":
        path = shards.parse_paths(cfg.path)[0][0]
        count = count or 16
        print(
            f"warning: no data.eval_path: evaluating on the first {count} blocks of the "
            f"training shards in {path} (not held out)",
            file=sys.stderr,
        )
        return shards.eval_examples(path, cfg.block_size, count, tokenizer, vocab_size, segments)
    held_out = examples.load_examples(
        cfg, tokenizer, cfg.eval_split, teacher, workdir, progress=progress
    )
    if count:
        held_out = {key: value[:count] for key, value in held_out.items()}
    return held_out

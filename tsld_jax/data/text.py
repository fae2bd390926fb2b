"""Language-modelling text (PTB, WikiText-2): the raw lines of a split, and the authors' block
protocol that training and the perplexity evaluation share.

Each line is stripped and tokenized on its own with the tokenizer's default special tokens; all
token lists are concatenated and cut into non-overlapping blocks (512 by default), the remainder
dropped. `bos="block"` is the variant for models trained with a BOS at the start of every
sequence (Gemma; docs/gemma3_gguf.md): the lines are tokenized as plain text (no special tokens
added, none parsed: PTB's literal "<unk>" is the five characters, as llama.cpp reads it, not the
model's untrained unknown token) and each block is a BOS and block_size - 1 text tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tsld_jax.data.sources import DataError, read_lines

# task -> (local file pattern under --data-dir, hub dataset args, text field).
_SOURCES = {
    "ptb": ("ptb/ptb.{split}.txt", ("ptb_text_only",), "sentence"),
    "wikitext2": ("wikitext-2/wiki.{split}.tokens", ("wikitext", "wikitext-2-v1"), "text"),
}
_LOCAL_SPLITS = {"validation": "valid", "valid": "valid", "test": "test", "train": "train"}


def load_lines(task: str, split: str, data_dir: str | None) -> list[str]:
    """The raw lines of a language-modelling split, from `data_dir` or the Hugging Face hub."""
    if task not in _SOURCES:
        raise DataError(f"unknown perplexity task {task!r}; expected one of {sorted(_SOURCES)}")
    if split not in _LOCAL_SPLITS:
        raise DataError(f"unknown split {split!r}; expected validation, test or train")
    pattern, hub_args, field = _SOURCES[task]
    if data_dir is not None:
        return read_lines(os.path.join(data_dir, pattern.format(split=_LOCAL_SPLITS[split])))
    import datasets

    hub_split = "validation" if split in ("valid", "validation") else split
    try:
        dataset = datasets.load_dataset(*hub_args, split=hub_split)
    except Exception as error:
        raise DataError(
            f"cannot load {'/'.join(hub_args)} from the hub ({type(error).__name__}); "
            "pass --data-dir with a local copy when offline"
        ) from None
    return list(dataset[field])


BOS_MODES = ("line", "block")


def tokenize_blocks(
    lines: Sequence[str], tokenizer: Any, block_size: int, bos: str = "line"
) -> np.ndarray:
    """Tokenizes each stripped line on its own, concatenates, cuts into (N, block_size) blocks.

    Args:
      lines: the raw lines.
      tokenizer: the model's tokenizer.
      block_size: tokens per block.
      bos: "line", the authors' protocol (each line with the tokenizer's default special
        tokens: a BOS per line where the tokenizer adds one); or "block" (plain text, a BOS at
        the start of each block; see the module docstring).
    """
    if bos not in BOS_MODES:
        raise DataError(f"unknown BOS mode {bos!r}; expected one of {BOS_MODES}")
    stripped = [line.strip() for line in lines]
    width = block_size
    if bos == "line":
        encoded = tokenizer(stripped)["input_ids"]
    else:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise DataError("bos='block' needs a tokenizer with a BOS token")
        encoded = tokenizer(stripped, add_special_tokens=False, split_special_tokens=True)
        encoded = encoded["input_ids"]
        width = block_size - 1
    ids = np.fromiter((t for seq in encoded for t in seq), dtype=np.int32)
    blocks = len(ids) // width
    if blocks == 0:
        raise DataError(f"{len(ids)} tokens is less than one block of {block_size}")
    out = ids[: blocks * width].reshape(blocks, width)
    if bos == "block":
        out = np.concatenate([np.full((blocks, 1), tokenizer.bos_token_id, np.int32), out], 1)
    return out

"""Training data: sources, tokenizing, token shards, packing and the checkpointable iterator.

One package for every source of training tokens; `tsld_jax.evaluation` reads its files through
`data.sources` and `data.text`, never the reverse.

- `sources`: file readers (text, jsonl, tsv, the hub) and `DataError`, the one-line data error.
- `text`: PTB / WikiText-2 lines and the authors' block protocol.
- `examples`: in-memory examples (PTB, WikiText-2, GSM8K, text/jsonl files, teacher-generated
  data) and `BatchIterator`, whose position is part of the checkpoint.
- `megatron`: Megatron's indexed .bin/.idx token files, read and written.
- `prepare`: tokenize once (`prepare_data.py`): inputs to shards and a manifest.
- `shards`: the shards streamed through grain (global shuffle, mixing, per-process rows).
- `training`: what the trainer reads (`train_batches`, `eval_examples`), from either.
"""

from tsld_jax.data import megatron, prepare, shards, sources, text, training
from tsld_jax.data.examples import (
    BatchIterator,
    Examples,
    gsm8k_examples,
    gsm8k_records,
    lm_examples,
    load_examples,
    read_jsonl,
    read_text_file,
    resolve_name,
)
from tsld_jax.data.sources import DataError
from tsld_jax.data.training import eval_examples, train_batches

__all__ = [
    "BatchIterator",
    "DataError",
    "Examples",
    "eval_examples",
    "gsm8k_examples",
    "gsm8k_records",
    "lm_examples",
    "load_examples",
    "megatron",
    "prepare",
    "read_jsonl",
    "read_text_file",
    "resolve_name",
    "shards",
    "sources",
    "text",
    "train_batches",
    "training",
]

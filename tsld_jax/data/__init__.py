"""Training data: sources, tokenizing, token shards, packing and the checkpointable iterator.

One package for every source of training tokens; `tsld_jax.evaluation` reads its files through
`data.sources` and `data.text`, never the reverse.

- `sources`: file readers (text, jsonl, tsv, the hub) and `DataError`, the one-line data error.
- `text`: PTB / WikiText-2 lines and the authors' block protocol.
- `examples`: in-memory examples (PTB, WikiText-2, GSM8K, text/jsonl files, teacher-generated
  data) and `BatchIterator`, whose position is part of the checkpoint.
"""

from tsld_jax.data import sources, text
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

__all__ = [
    "BatchIterator",
    "DataError",
    "Examples",
    "gsm8k_examples",
    "gsm8k_records",
    "lm_examples",
    "load_examples",
    "read_jsonl",
    "read_text_file",
    "resolve_name",
    "sources",
    "text",
]

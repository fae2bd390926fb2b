"""In-memory training data: tokenized examples of a fixed length, and a batch iterator whose
position is part of the checkpoint.

Every example is three int32 arrays of length T: `tokens`, `attention_mask` (1 for real tokens)
and `loss_mask` (1 where the next-token prediction *into* this position counts; position 0 never
counts). Language-modelling data (PTB, WikiText-2, local text) use the perplexity task's block
protocol; GSM8K is one padded "Question: ...\\nAnswer: ..." sequence per problem with the loss on
the answer only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from tsld_jax import generated_data
from tsld_jax.data import sources, text
from tsld_jax.data.sources import DataError

Examples = dict[str, np.ndarray]


def lm_examples(blocks_NxT: np.ndarray) -> Examples:
    """Dense language-modelling blocks: every position is real and every prediction counts."""
    ones = np.ones_like(blocks_NxT, dtype=np.int32)
    return {"tokens": blocks_NxT.astype(np.int32), "attention_mask": ones, "loss_mask": ones}


def read_jsonl(path: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The `fields` of each record of a .jsonl file (malformed lines: an error naming the line)."""
    return [{f: r[f] for f in fields} for r in sources.read_jsonl(path, fields)]


def read_text_file(path: str, text_field: str = "text") -> list[str]:
    """Lines of a .txt file, or the `text_field` of each record of a .jsonl file."""
    if path.endswith(".jsonl"):
        return [str(r[text_field]) for r in read_jsonl(path, (text_field,))]
    return sources.read_lines(path)


def gsm8k_records(split: str, data_dir: str | None) -> list[dict[str, str]]:
    """GSM8K problems ({"question", "answer"}) from `data_dir/gsm8k/{split}.jsonl` or the hub."""
    split = {"validation": "test", "valid": "test"}.get(split, split)
    if data_dir:
        return read_jsonl(os.path.join(data_dir, "gsm8k", f"{split}.jsonl"), ("question", "answer"))
    import datasets

    try:
        dataset = datasets.load_dataset("gsm8k", "main", split=split)
    except Exception as error:
        raise DataError(
            f"cannot load gsm8k from the hub ({type(error).__name__}); pass a data dir offline"
        ) from None
    return [{"question": r["question"], "answer": r["answer"]} for r in dataset]


def gsm8k_examples(records: list[dict[str, str]], tokenizer: Any, length: int) -> Examples:
    """One right-padded sequence per problem; the loss counts on the answer tokens only."""
    n = len(records)
    tokens = np.zeros((n, length), np.int32)
    attention = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.int32)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or eos or 0
    tokens[:] = pad
    for i, record in enumerate(records):
        prompt = tokenizer(f"Question: {record['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + record["answer"], add_special_tokens=False)["input_ids"]
        if eos is not None:
            answer = [*answer, eos]
        ids = (prompt + answer)[:length]
        tokens[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        loss[i, len(prompt) : len(ids)] = 1
    if not loss.any():
        raise DataError(f"no answer token fits in {length} tokens; raise data.block_size")
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def load_examples(
    cfg, tokenizer: Any, split: str = "train", teacher=None, workdir=None, progress: bool = True
):
    """The examples a data config names (see configs/base.py, `data.*`).

    Args:
      cfg: the `config.data` ConfigDict.
      tokenizer: the model's tokenizer.
      split: "train" or the held-out split.
      teacher: (params, spec) of the teacher, for generated data.
      workdir: where generated data are cached.
      progress: a progress bar while the teacher's data are sampled.
    """
    name = resolve_name(cfg)
    data_dir = cfg.dir or None
    if name in ("ptb", "wikitext2"):
        lines = text.load_lines(name, split, data_dir)
        examples = lm_examples(
            text.tokenize_blocks(lines, tokenizer, cfg.block_size, cfg.get("bos", "line"))
        )
    elif name == "text":
        lines = read_text_file(cfg.path, cfg.text_field)
        examples = lm_examples(
            text.tokenize_blocks(lines, tokenizer, cfg.block_size, cfg.get("bos", "line"))
        )
    elif name == "gsm8k":
        examples = gsm8k_examples(gsm8k_records(split, data_dir), tokenizer, cfg.block_size)
    elif name == "generated":
        examples = lm_examples(
            generated_data.load_or_sample(
                cfg, tokenizer, teacher, workdir, split, progress=progress
            )
        )
    else:
        raise DataError(f"unknown data set {name!r}")
    count = len(examples["tokens"])
    if count == 0:
        raise DataError(f"data set {name!r} ({split}) is empty")
    return examples


def resolve_name(cfg) -> str:
    """`data.name`, with "auto" resolved: PTB when a data dir is given, else generated data."""
    if cfg.name == "auto":
        return "ptb" if cfg.dir else "generated"
    return cfg.name


@dataclasses.dataclass
class BatchIterator:
    """Fixed-size batches in a per-epoch shuffled order that is a function of (seed, epoch).

    The position (epoch, index into the epoch's order) is all the state there is, so a run
    restored from a checkpoint that saved `state()` sees exactly the batches it would have seen.
    The last incomplete batch of each epoch is dropped (fixed shapes, one compilation).
    """

    examples: Examples
    batch_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self):
        n = len(self.examples["tokens"])
        if n < self.batch_size:
            raise DataError(f"{n} training examples is fewer than one batch of {self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples["tokens"]) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.examples["tokens"]))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[Examples]:
        return self

    def __next__(self) -> Examples:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        rows = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return {key: value[rows] for key, value in self.examples.items()}

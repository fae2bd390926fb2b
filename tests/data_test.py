"""Training data: deterministic resumable batches, GSM8K answer-only masks, clear data errors."""

import json

import ml_collections
import numpy as np
import pytest

from tsld_jax import data
from tsld_jax.evaluation.perplexity import DataError
from tsld_jax.models import named


def _examples(n=10, length=4):
    return data.lm_examples(np.arange(n * length).reshape(n, length))


def test_batches_are_deterministic_and_resume_exactly():
    first = data.BatchIterator(_examples(), batch_size=3, seed=7)
    seen = [next(first)["tokens"] for _ in range(7)]  # crosses two epoch boundaries (3 per epoch)
    again = data.BatchIterator(_examples(), batch_size=3, seed=7)
    for _ in range(4):
        next(again)
    resumed = data.BatchIterator(_examples(), batch_size=3, seed=7)
    resumed.restore(again.state())
    for want in seen[4:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)
    epoch0 = np.concatenate(seen[:3])[:, 0]
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch; remainder dropped
    assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:6]))  # reshuffled


def test_fewer_examples_than_a_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        data.BatchIterator(_examples(n=2), batch_size=3, seed=0)


def test_gsm8k_loss_mask_covers_the_answer_only(shared_data):
    records = data.gsm8k_records("train", str(shared_data))[:3]
    tokenizer = named.ByteTokenizer()
    examples = data.gsm8k_examples(records, tokenizer, length=1024)
    for i, record in enumerate(records):
        prompt = f"Question: {record['question']}\nAnswer:".encode()
        answer = (" " + record["answer"]).encode()
        counted = examples["tokens"][i][examples["loss_mask"][i] == 1]
        assert bytes(counted.tolist()) == answer
        assert examples["attention_mask"][i].sum() == len(prompt) + len(answer)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:2"):
        data.read_text_file(str(path))


def test_empty_text_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    cfg = ml_collections.ConfigDict(
        {"name": "text", "path": str(path), "text_field": "text", "block_size": 8, "dir": ""}
    )
    with pytest.raises(DataError, match="less than one block"):
        data.load_examples(cfg, named.ByteTokenizer())

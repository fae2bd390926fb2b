"""The shard loader (tsld_jax/data/shards.py): blocks of the token stream, a global shuffle that
is a new permutation each epoch, mixing by weight, exact resume from the iterator's state, each
process's rows being its slice of the global batch (in one process, and in two real
jax.distributed processes), and one error line naming the file for each bad input."""

import json
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from tsld_jax import data
from tsld_jax.data import prepare, shards
from tsld_jax.data.sources import DataError
from tsld_jax.models import named
from tsld_jax.quant import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = named.ByteTokenizer()


def _prepare(folder, files: dict[str, str]):
    source = folder.parent / f"{folder.name}_inputs"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    prepare.prepare([str(source)], str(folder), BYTES, "random", workers=0, log=lambda _: None)
    return str(folder)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    files = {
        f"{i}.txt": "\n".join("".join(rng.choice(list("abcdef"), 30)) for _ in range(40))
        for i in range(3)
    }
    return _prepare(tmp_path / "corpus", files)


def _stream(path):
    # Independent of the loader: each shard's .bin read whole with numpy, in manifest order.
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    return [
        np.fromfile(os.path.join(path, s["name"] + ".bin"), np.uint16) for s in manifest["shards"]
    ]


def _blocks(path, size=16):
    return shards.Blocks(shards.Corpus(path), size)


def test_blocks_are_each_shards_stream_cut_in_order(corpus):
    blocks = _blocks(corpus)
    want = []
    for stream in _stream(corpus):
        want += [stream[i * 16 : (i + 1) * 16] for i in range(len(stream) // 16)]
    assert len(blocks) == len(want)
    for i, block in enumerate(want):
        np.testing.assert_array_equal(blocks[i], block)
    assert blocks[0].dtype == np.int32


def _take(iterator, n):
    return [next(iterator)["tokens"] for _ in range(n)]


def test_global_shuffle_is_a_permutation_per_epoch_and_deterministic(corpus):
    blocks = _blocks(corpus)
    one = shards.ShardBatches([(blocks, 1.0)], 4, seed=5, process_index=0, process_count=1)
    per_epoch = one.batches_per_epoch
    assert per_epoch == len(blocks) // 4
    seen = np.concatenate(_take(one, 2 * per_epoch))
    index = {tuple(blocks[i].tolist()): i for i in range(len(blocks))}
    order = [index[tuple(row.tolist())] for row in seen]
    epoch0, epoch1 = order[: per_epoch * 4], order[per_epoch * 4 :]
    assert len(set(epoch0)) == len(epoch0)  # no block twice in an epoch
    assert epoch0 != sorted(epoch0)  # shuffled
    assert epoch0 != epoch1  # reshuffled for the next epoch
    threads = shards.ShardBatches([(blocks, 1.0)], 4, 5, 0, 1, workers=3)
    np.testing.assert_array_equal(np.concatenate(_take(threads, 2 * per_epoch)), seen)
    other_seed = shards.ShardBatches([(blocks, 1.0)], 4, 6, 0, 1)
    assert not np.array_equal(np.concatenate(_take(other_seed, per_epoch)), seen[: per_epoch * 4])


def test_restored_state_continues_exactly(corpus):
    blocks = _blocks(corpus)
    unbroken = shards.ShardBatches([(blocks, 1.0)], 4, 1, 0, 1, workers=2)
    want = _take(unbroken, 9)
    first = shards.ShardBatches([(blocks, 1.0)], 4, 1, 0, 1, workers=2)
    _take(first, 4)
    state = json.loads(json.dumps(first.state()))  # as the checkpoint's JSON stores it
    resumed = shards.ShardBatches([(blocks, 1.0)], 4, 1, 0, 1, workers=2)
    resumed.restore(state)
    for a, b in zip(_take(resumed, 5), want[4:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resume_over_other_shards_is_refused(corpus, tmp_path):
    first = shards.ShardBatches([(_blocks(corpus), 1.0)], 4, 1, 0, 1)
    _take(first, 2)
    other = _prepare(tmp_path / "other", {"x.txt": "z" * 4000})
    moved = shards.ShardBatches([(_blocks(other), 1.0)], 4, 1, 0, 1)
    with pytest.raises(DataError, match=r"not the ones the checkpoint's run read"):
        moved.restore(first.state())
    reweighted = shards.ShardBatches([(_blocks(corpus), 2.0)], 4, 1, 0, 1)
    with pytest.raises(DataError, match=r"not the ones the checkpoint's run read"):
        reweighted.restore(first.state())


def test_each_process_reads_its_slice_of_the_global_batch(corpus):
    blocks = _blocks(corpus)
    whole = _take(shards.ShardBatches([(blocks, 1.0)], 4, 2, 0, 1), 6)
    parts = [_take(shards.ShardBatches([(blocks, 1.0)], 4, 2, p, 2), 6) for p in range(2)]
    for step in range(6):
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole[step])
    with pytest.raises(DataError, match="does not divide over 3 processes"):
        shards.ShardBatches([(blocks, 1.0)], 4, 2, 0, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_read_the_one_process_global_batch(corpus, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(ROOT, "tests", "shards_two_process.py")
    outputs = [tmp_path / f"p{i}.npz" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, script, address, str(i), corpus, str(outputs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    cfg = ml_collections.ConfigDict(
        {"name": "shards", "path": corpus, "block_size": 8, "batch_size": 4, "workers": 1}
    )
    single = data.train_batches(cfg, 3, BYTES, 256)
    # (train_batches reads jax's process count: one process here.)
    want = np.stack(_take(single, 3))
    local = [np.load(path)["local"] for path in outputs]
    assert local[0].shape == (3, 2, 8)
    np.testing.assert_array_equal(np.concatenate(local, axis=1), want)
    for path in outputs:  # the global array the trainer's step sees, gathered back
        np.testing.assert_array_equal(np.load(path)["gathered"], want)


def test_corpora_mix_by_weight(tmp_path):
    a = _prepare(tmp_path / "a", {"a.txt": "a" * 4000})
    b = _prepare(tmp_path / "b", {"b.txt": "b" * 4000})
    cfg = ml_collections.ConfigDict(
        {"name": "shards", "path": f"{a}:3,{b}", "block_size": 8, "batch_size": 8, "workers": 1}
    )
    iterator = data.train_batches(cfg, 0, BYTES, 256)
    rows = np.concatenate(_take(iterator, 50))
    share = np.mean(rows[:, 0] == ord("a"))
    assert share == pytest.approx(0.75, abs=0.01)
    assert shards.parse_paths("/x/y:0.5, /z") == [("/x/y", 0.5), ("/z", 1.0)]
    assert shards.parse_paths("/odd:name") == [("/odd:name", 1.0)]


def test_document_attention_yields_segment_ids(tmp_path):
    """data.document_attention: each row comes with its segment ids, a new segment after each
    document's EOS. The loader reads them from the index's document boundaries; the reference
    counts the EOS tokens in the row before each position (independent of the index)."""
    rng = np.random.default_rng(1)
    files = {
        f"{i}.txt": "\n".join("x" * int(n) for n in rng.integers(1, 30, size=50)) for i in range(2)
    }
    source = tmp_path / "inputs"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    eos = named.ByteTokenizer()
    eos.eos_token_id = 10  # "\n": never inside a document of one line, so it marks the ends
    path = str(tmp_path / "docs")
    prepare.prepare([str(source)], path, eos, "random", workers=0, log=lambda _: None)
    cfg = ml_collections.ConfigDict(
        {"name": "shards", "path": path, "block_size": 24, "batch_size": 4, "workers": 1}
        | {"document_attention": True}
    )
    iterator = data.train_batches(cfg, 0, eos, 256)
    batches = [next(iterator) for _ in range(12)]
    ends = 0
    for batch in batches:
        tokens, segments = batch["tokens"], batch["segment_ids"]
        assert segments.shape == tokens.shape and segments.dtype == np.int32
        is_eos = (tokens == 10).astype(np.int32)
        want = np.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before each position
        np.testing.assert_array_equal(segments, want)
        ends += is_eos[:, :-1].sum()
    assert ends > 20  # the rows hold several documents each
    # The same rows as without the option: the order does not depend on it.
    # Held-out blocks are scored as training reads them: with their segment ids.
    eval_cfg = ml_collections.ConfigDict({**cfg, "eval_path": path, "eval_blocks": 5})
    held_out = data.eval_examples(eval_cfg, eos, 256)
    is_eos = (held_out["tokens"] == 10).astype(np.int32)
    np.testing.assert_array_equal(held_out["segment_ids"], np.cumsum(is_eos, axis=1) - is_eos)
    cfg.document_attention = False
    plain = data.train_batches(cfg, 0, eos, 256)
    for batch in batches:
        row = next(plain)
        assert "segment_ids" not in row
        np.testing.assert_array_equal(row["tokens"], batch["tokens"])


def test_eval_examples_are_the_first_blocks_in_order(corpus, tmp_path):
    cfg = ml_collections.ConfigDict(
        {"name": "ptb", "eval_path": corpus, "block_size": 16, "eval_blocks": 3}
    )
    held_out = data.eval_examples(cfg, BYTES, 256)
    blocks = _blocks(corpus)
    np.testing.assert_array_equal(held_out["tokens"], np.stack([blocks[i] for i in range(3)]))
    assert held_out["loss_mask"].all() and held_out["attention_mask"].all()


def test_bad_shards_name_the_file(corpus, tmp_path):
    with pytest.raises(DataError, match=r"no_shards: no manifest\.json"):
        shards.Corpus(str(tmp_path / "no_shards"))
    other = export.TokenizerIdentity(300, "0" * 64)
    with pytest.raises(DataError, match=r"manifest\.json: the shards were made with .* random"):
        shards.Corpus(corpus, identity=other)
    with pytest.raises(DataError, match=r"00000-0\.bin: token id \d+ is outside .* 50-token"):
        shards.Corpus(corpus, vocab_size=50)
    assert shards.Corpus(corpus, export.tokenizer_identity(BYTES), 256)  # the right one passes
    bin_path = os.path.join(corpus, "00002-2.bin")  # the last shard
    with open(bin_path, "r+b") as f:  # same size, one byte changed
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    blocks = _blocks(corpus)
    blocks[0]  # shard 0 is fine
    with pytest.raises(DataError, match=r"00002-2\.bin does not match its sha256"):
        blocks[len(blocks) - 1]
    with open(bin_path, "ab") as f:
        f.write(b"xx")
    with pytest.raises(DataError, match=r"00002-2\.bin: \d+ bytes, its manifest entry says"):
        _blocks(corpus)[len(blocks) - 1]
    manifest_path = os.path.join(corpus, "manifest.json")
    manifest = json.load(open(manifest_path))
    for entry in manifest["shards"]:
        entry["tokens"] = 0
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(DataError, match="empty corpus"):
        shards.Corpus(corpus)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"name": "shards"}, r"config\.data\.path: must name a prepare_data\.py output"),
        ({"name": "shards", "path": "/no/such/dir"}, r"data\.path: '/no/such/dir' is not a dir"),
        ({"name": "shards", "path": "{corpus}:-1"}, r"data\.path: .*weight .* must be > 0"),
        ({"eval_path": "/no/such/dir"}, r"data\.eval_path: '/no/such/dir' is not a directory"),
        ({"eval_path": "{corpus},{corpus}"}, r"data\.eval_path: names one shard directory"),
        (
            {"name": "ptb", "document_attention": True},
            r"data\.document_attention: needs data\.name=shards",
        ),
    ],
)
def test_shard_config_errors_name_the_field(fields, message, corpus):
    from configs import smoke
    from tsld_jax import config_utils

    cfg = smoke.get_config()
    for key, value in fields.items():
        cfg.data[key] = value.format(corpus=corpus) if isinstance(value, str) else value
    with pytest.raises(config_utils.ConfigError, match=message):
        config_utils.validate(cfg)

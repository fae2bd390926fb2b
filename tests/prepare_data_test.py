"""prepare_data.py: Megatron .bin/.idx read and written to the documented layout, token ids equal
to the tokenizer's, resume after SIGKILL to the same bytes, a second run doing nothing, and one
error line naming the file for each bad input."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny_models

from tsld_jax.data import megatron, prepare, shards
from tsld_jax.data.sources import DataError
from tsld_jax.models import named

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Megatron's dtype codes, written out again here rather than taken from megatron.DTYPES.
_CODES = {np.uint16: 8, np.int32: 4}


def _write_megatron(prefix, documents, dtype=np.uint16):
    """An independent writer of the layout Megatron documents: each document a list of
    sequences (lists of ids)."""
    lengths, pointers, document_index, offset = [], [], [0], 0
    with open(prefix + ".bin", "wb") as f:
        for document in documents:
            for sequence in document:
                data = np.asarray(sequence, dtype=dtype).tobytes()
                f.write(data)
                lengths.append(len(sequence))
                pointers.append(offset)
                offset += len(data)
            document_index.append(len(lengths))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_index)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(document_index)}q", *document_index))


def _read_idx(path):
    """An independent reader: (dtype code, lengths, pointers, document index)."""
    data = open(path, "rb").read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, documents = struct.unpack("<QBQQ", data[9:34])
    assert version == 1
    at = 34
    lengths = struct.unpack(f"<{sequences}i", data[at : at + 4 * sequences])
    at += 4 * sequences
    pointers = struct.unpack(f"<{sequences}q", data[at : at + 8 * sequences])
    at += 8 * sequences
    index = struct.unpack(f"<{documents}q", data[at : at + 8 * documents])
    assert at + 8 * documents == len(data)
    return code, list(lengths), list(pointers), list(index)


def test_reads_an_independently_written_megatron_file(tmp_path):
    documents = [[[5, 6, 7], [8]], [[9, 10]], [[300, 65535, 0]]]
    _write_megatron(str(tmp_path / "corpus"), documents)
    indexed = megatron.IndexedFile(str(tmp_path / "corpus"))
    assert (indexed.num_sequences, indexed.num_documents, indexed.num_tokens) == (4, 3, 9)
    assert indexed.dtype == np.uint16
    for d, document in enumerate(documents):
        want = [t for sequence in document for t in sequence]
        assert indexed.document(d).tolist() == want
    assert indexed.sequence(1).tolist() == [8]


def test_written_index_reads_back_with_an_independent_reader(tmp_path):
    lengths = [3, 1, 4]
    megatron.write_index(str(tmp_path / "x.idx"), np.array(lengths), np.dtype(np.int32))
    code, got_lengths, pointers, index = _read_idx(tmp_path / "x.idx")
    assert (code, got_lengths) == (4, lengths)
    assert pointers == [0, 12, 16]  # byte offsets of int32 tokens
    assert index == [0, 1, 2, 3]


def test_cut_short_or_mismatched_files_name_the_file(tmp_path):
    _write_megatron(str(tmp_path / "c"), [[[1, 2, 3]]])
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=r"c\.bin: 8 bytes, its index .* says 6"):
        megatron.IndexedFile(str(tmp_path / "c"))
    (tmp_path / "d.idx").write_bytes(b"NOTMEGATRON" * 4)
    (tmp_path / "d.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"d\.idx is not a Megatron"):
        megatron.IndexedFile(str(tmp_path / "d"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    text = "the quick brown fox jumps over the lazy dog. " * 50
    tokenizer = tiny_models.save_bpe_tokenizer(str(directory), text, vocab_size=300)
    return str(directory), tokenizer


def _corpus(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("the quick fox\n\n  jumps over  \nthe dog\n")
    (folder / "b.jsonl").write_text(
        json.dumps({"text": "lazy dog"}) + "\n" + json.dumps({"text": "brown fox"}) + "\n"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["over the", "quick quick"]}), folder / "c.parquet")
    return ["the quick fox", "  jumps over  ", "the dog", "lazy dog", "brown fox"] + [
        "over the",
        "quick quick",
    ]


def test_token_ids_equal_the_tokenizers_and_eos_ends_each_document(tmp_path, bpe):
    directory, tokenizer = bpe
    texts = _corpus(tmp_path / "in")
    manifest = prepare.prepare(
        [str(tmp_path / "in")], str(tmp_path / "out"), tokenizer, directory, workers=0
    )
    assert [s["name"] for s in manifest["shards"]] == ["00000-a", "00001-b", "00002-c"]
    got = []
    for entry in manifest["shards"]:
        indexed = megatron.IndexedFile(str(tmp_path / "out" / entry["name"]))
        got += [indexed.document(d).tolist() for d in range(indexed.num_documents)]
    eos = tokenizer.eos_token_id
    assert got == [tokenizer(text)["input_ids"] + [eos] for text in texts]
    assert manifest["documents"] == 7
    assert manifest["tokens"] == sum(len(ids) for ids in got)
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer.get_vocab())


def test_worker_processes_write_the_same_bytes(tmp_path, bpe):
    directory, tokenizer = bpe
    _corpus(tmp_path / "in")
    options = prepare.Options(chunk_documents=2)
    for workers in (0, 2):
        prepare.prepare(
            [str(tmp_path / "in")],
            str(tmp_path / f"out{workers}"),
            tokenizer,
            directory,
            workers=workers,
            options=options,
        )
    for name in ("00000-a.bin", "00000-a.idx", "00001-b.bin", "00002-c.idx", "manifest.json"):
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        **kwargs,
    )


def _snapshot(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def test_killed_run_resumes_to_the_same_bytes_and_a_second_run_does_nothing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        lines = ["".join(rng.choice(list("abcdefgh "), 60)) for _ in range(60000)]
        (inputs / f"part{i}.txt").write_text("\n".join(lines))
    whole = _cli("--tokenizer=random", "--input", str(inputs), "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    command = [sys.executable, os.path.join(ROOT, "prepare_data.py"), "--tokenizer=random"]
    command += ["--input", str(inputs), "--output", str(tmp_path / "out"), "--workers=0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "out" / "00000-part0.json"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    left = os.listdir(tmp_path / "out")
    assert "manifest.json" not in left
    assert "00003-part3.json" not in left
    # Whatever the kill left is either complete or a hidden temporary, never a bare shard file.
    for name in left:
        if not name.startswith("."):
            stem = name.rsplit(".", 1)[0]
            assert f"{stem}.json" in left or name.endswith((".bin", ".idx")), name

    resumed = _cli("--tokenizer=random", "--input", str(inputs), "--output", str(tmp_path / "out"))
    assert resumed.returncode == 0, resumed.stderr
    assert "00000-part0:" not in resumed.stdout  # kept, not redone
    visible = {k: v for k, v in _snapshot(tmp_path / "out").items() if not k.startswith(".")}
    assert visible == _snapshot(tmp_path / "whole")

    before = {p: os.stat(tmp_path / "out" / p).st_mtime_ns for p in os.listdir(tmp_path / "out")}
    again = _cli("--tokenizer=random", "--input", str(inputs), "--output", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    after = {p: os.stat(tmp_path / "out" / p).st_mtime_ns for p in os.listdir(tmp_path / "out")}
    assert after == before


def _one_error(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_inputs_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    line = _one_error(
        _cli("--tokenizer=random", "--input", str(tmp_path / "empty.txt"), "--output", "/tmp/x")
    )
    assert "empty corpus" in line and "empty.txt" in line
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    line = _one_error(
        _cli("--tokenizer=random", "--input", str(tmp_path / "bad.jsonl"), "--output", "/tmp/x")
    )
    assert "bad.jsonl:2: malformed JSON" in line
    line = _one_error(
        _cli("--tokenizer=random", "--input", str(tmp_path / "nope.txt"), "--output", "/tmp/x")
    )
    assert "nope.txt" in line


class _HugeVocabulary:
    """A tokenizer of 70000 ids: too many for uint16."""

    eos_token_id = 69999

    def get_vocab(self):
        return {f"t{i}": i for i in range(70000)}

    def __call__(self, texts):
        return {"input_ids": [[69998] * len(t) for t in texts]}


def test_a_vocabulary_too_large_for_the_dtype(tmp_path):
    (tmp_path / "a.txt").write_text("ab\n")
    with pytest.raises(DataError, match="70000 tokens does not fit uint16"):
        prepare.prepare(
            [str(tmp_path / "a.txt")],
            str(tmp_path / "out"),
            _HugeVocabulary(),
            "huge",
            workers=0,
            options=prepare.Options(dtype="uint16"),
        )
    manifest = prepare.prepare(
        [str(tmp_path / "a.txt")], str(tmp_path / "out"), _HugeVocabulary(), "huge", workers=0
    )
    assert manifest["shards"][0]["dtype"] == "int32"
    indexed = megatron.IndexedFile(str(tmp_path / "out" / "00000-a"))
    assert indexed.document(0).tolist() == [69998, 69998, 69999]


def test_existing_megatron_files_are_adopted_and_checked(tmp_path):
    _write_megatron(str(tmp_path / "old"), [[[1, 2], [3]], [[4, 5, 6]]])
    tokenizer = named.ByteTokenizer()
    manifest = prepare.prepare(
        [str(tmp_path / "old.idx")], str(tmp_path / "out"), tokenizer, "random", workers=0
    )
    assert (manifest["documents"], manifest["tokens"]) == (2, 6)
    blocks = shards.Blocks(shards.Corpus(str(tmp_path / "out")), 3)
    assert [blocks[i].tolist() for i in range(len(blocks))] == [[1, 2, 3], [4, 5, 6]]
    _write_megatron(str(tmp_path / "wide"), [[[1, 300]]])
    with pytest.raises(DataError, match=r"wide\.bin: token id 300 is outside .* 256-token"):
        prepare.prepare(
            [str(tmp_path / "wide.idx")], str(tmp_path / "out2"), tokenizer, "random", workers=0
        )

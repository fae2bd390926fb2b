"""Megatron's memory-mapped indexed token files (`PREFIX.bin` + `PREFIX.idx`, "MMIDIDX").

The format Megatron-LM, GPT-NeoX and OLMo write and MaxText reads, so that a corpus tokenized for
one of them trains here as is (docs/data.md). Written here in our own words from the layout
Megatron documents (`megatron/core/datasets/indexed_dataset.py`), rather than imported: that
module needs torch, and the layout is small and fixed.

`PREFIX.bin`: the token ids of every sequence, back to back, in one little-endian dtype.

`PREFIX.idx`, all little-endian:

    9 bytes   b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
              8 uint16)
    uint64    S, the number of sequences
    uint64    D, the number of entries of the document index (documents + 1)
    int32[S]  each sequence's length in tokens
    int64[S]  each sequence's byte offset in PREFIX.bin
    int64[D]  the document index: document d is sequences [index[d], index[d + 1]); index[0] = 0

(Megatron may append int8[S] sequence modes for multimodal data; text files have none.) The
files `prepare_data.py` writes hold one sequence per document, each ending with the EOS token
(Megatron's `--append-eod`), so that the token stream of a file is the documents with EOS
between them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO

import numpy as np

from tsld_jax.data.sources import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
TOKEN_DTYPES = ("uint16", "int32")  # what prepare_data.py writes
_HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype `prepare_data.py` writes that holds every id below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def write_index(
    path: str, lengths: np.ndarray, dtype: np.dtype, documents: np.ndarray | None = None
) -> None:
    """Writes PREFIX.idx for sequences of `lengths` tokens stored back to back in PREFIX.bin.

    Args:
      path: the .idx file.
      lengths: (S,) tokens per sequence.
      dtype: the token dtype of the .bin file.
      documents: (D,) the document index; by default one document per sequence.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() >= 2**31):
        raise ValueError("a sequence length does not fit the index's int32")
    if documents is None:
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODES[np.dtype(dtype)], len(lengths), len(documents)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.asarray(documents, np.int64).astype("<i8").tobytes())


class BinWriter:
    """Appends documents to a .bin file and hashes the bytes as they go (no second read)."""

    def __init__(self, f: BinaryIO, dtype: np.dtype):
        self._file, self.dtype = f, np.dtype(dtype)
        self.lengths: list[int] = []
        self.sha256 = hashlib.sha256()
        self.tokens = 0
        self.max_token = -1

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents whose tokens are `ids` back to back, `lengths` tokens each."""
        data = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<")).tobytes()
        self._file.write(data)
        self.sha256.update(data)
        self.lengths.extend(int(n) for n in lengths)
        self.tokens += len(ids)
        if len(ids):
            self.max_token = max(self.max_token, int(np.max(ids)))


class IndexedFile:
    """A Megatron .bin/.idx pair, memory-mapped: nothing is read until a slice is taken.

    Raises:
      DataError: (naming the file) a missing file, a bad magic, version or dtype code, an index
        cut short, or a .bin whose size is not what the index says.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._fd = None
        self.idx_path, self.bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(f"cannot read {path}: No such file")
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != MAGIC:
            raise DataError(f"{self.idx_path} is not a Megatron MMIDIDX index (bad header)")
        _, version, code, sequences, documents = _HEADER.unpack(header)
        if version != VERSION:
            raise DataError(f"{self.idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = DTYPES[code]
        need = _HEADER.size + sequences * (4 + 8) + documents * 8
        if size < need:
            raise DataError(f"{self.idx_path} is cut short ({size} bytes, the header says {need})")
        offset = _HEADER.size
        self.lengths = np.memmap(self.idx_path, "<i4", "r", offset, (sequences,))
        offset += sequences * 4
        self.pointers = np.memmap(self.idx_path, "<i8", "r", offset, (sequences,))
        offset += sequences * 8
        self.document_index = np.memmap(self.idx_path, "<i8", "r", offset, (documents,))
        self.num_sequences = int(sequences)
        self.num_documents = max(int(documents) - 1, 0)
        bin_size = os.path.getsize(self.bin_path)
        if sequences:
            expected = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize
        else:
            expected = 0
        if bin_size != expected:
            raise DataError(
                f"{self.bin_path}: {bin_size} bytes, its index {self.idx_path} says {expected}"
            )
        self.num_tokens = bin_size // self.dtype.itemsize
        # np.memmap cannot map an empty file.
        self.tokens = (
            np.memmap(self.bin_path, self.dtype.newbyteorder("<"), "r")
            if self.num_tokens
            else np.zeros(0, self.dtype)
        )

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the .bin, read with one pread: unlike a slice of
        the memory map, it leaves no mapped pages behind, so a pass over a corpus larger than
        memory keeps the process's resident memory flat (bench/data.py)."""
        if self._fd is None:
            self._fd = os.open(self.bin_path, os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._fd, count * size, start * size)
        return np.frombuffer(data, self.dtype.newbyteorder("<"))

    def document_starts(self, start: int, count: int) -> np.ndarray:
        """The offsets, relative to `start`, of the documents that begin inside tokens
        (start, start + count): two binary searches over the memory-mapped index (a few pages
        read), nothing held in memory."""
        size = self.dtype.itemsize
        # The sequences that begin after the first token of the range and inside it.
        first, last = np.searchsorted(self.pointers, [(start + 1) * size, (start + count) * size])
        sequences = np.arange(first, last, dtype=np.int64)
        # Those that begin a document (the document index lists each document's first sequence).
        at = np.searchsorted(self.document_index, sequences)
        inside = at < len(self.document_index)
        begins = np.zeros(len(sequences), bool)
        begins[inside] = self.document_index[at[inside]] == sequences[inside]
        offsets = np.asarray(self.pointers[sequences[begins]]) // size - start
        # A document of no tokens shares its start with the next one.
        return np.unique(offsets)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.lengths[i])])

    def document(self, d: int) -> np.ndarray:
        """The tokens of document d (its sequences back to back)."""
        first, last = int(self.document_index[d]), int(self.document_index[d + 1])
        if first == last:
            return np.zeros(0, self.dtype)
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.lengths[last - 1])
        return np.asarray(self.tokens[start:stop])


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

"""Streaming token shards (`prepare_data.py`'s output) through grain: blocks, a global shuffle,
mixing by weight, each process reading only its rows, and a state for the checkpoint.

A corpus (one shard directory) is the token streams of its shards, each cut into blocks of
`block_size` tokens (a shard's last partial block dropped). Since every document ends with EOS
in the files, a block is documents packed back to back with EOS between them, read with one
pread: nothing is tokenized, copied whole, memory-mapped or held in memory, so the host's
memory stays flat over a pass (bench/data.py measures it). With `data.document_attention`, each
block also comes with its segment ids (B, T), the document of each token, from the shard index's
document boundaries (two binary searches in the memory-mapped .idx per block), for a mask that
keeps attention within a document.

Order: grain's index shuffle (a permutation computed per index, O(1) memory) of each corpus's
blocks from the seed, a new permutation each epoch; several corpora are interleaved by
weight (grain's `MapDataset.mix`). The global batch of step s is elements [s*B, (s+1)*B) of
that sequence, and process p of P reads only rows [p*B/P, (p+1)*B/P) of it, which
`jax.make_array_from_process_local_data` puts together (trainer._device_batch). The order is a
function of (seed, block_size, corpora, weights, batch size) alone: the same on every host, for
any number of loader threads, and after a restart. The iterator's state (grain's
`get_state()`, the index of the next local batch, with a fingerprint of the shards and weights
it is a position in) goes into every checkpoint; a resume over other shards is refused.

Checks: a directory without manifest.json, a tokenizer whose fingerprint differs from the
manifest's, a token id outside the model's vocabulary, an empty corpus, and a shard whose size
or sha256 differs from its manifest entry all raise one-line `DataError`s naming the file. The
sha256 of a shard is computed when it is first opened in a process (reading it once at disk
speed, about 1-2 s per GB; `bench/data.py` measures it).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np

from tsld_jax.data import megatron, prepare
from tsld_jax.data.sources import DataError

# The local rows a run may read: "endless" (grain's range needs a length, and sys.maxsize
# overflows its batching).
_ENDLESS = 2**50


def parse_paths(spec: str) -> list[tuple[str, float]]:
    """`data.path` of `name="shards"`: "DIR" or "DIR1:W1,DIR2:W2" (weights; 1 when left out)."""
    corpora = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass  # a ':' inside the path
        if not weight > 0:
            raise DataError(f"data.path: the weight of {path} must be > 0, got {weight}")
        corpora.append((path, weight))
    if not corpora:
        raise DataError("data.path names no shard directory")
    return corpora


class Corpus:
    """One shard directory: its manifest, checked against the model, and its shards, each opened
    (and its checksum checked) when first read."""

    def __init__(self, path: str, identity=None, vocab_size: int | None = None):
        self.path = path
        self.manifest_path = os.path.join(path, prepare.MANIFEST)
        if not os.path.isfile(self.manifest_path):
            raise DataError(
                f"{path}: no {prepare.MANIFEST}; write the shards with prepare_data.py --output"
            )
        try:
            with open(self.manifest_path) as f:
                self.manifest = json.load(f)
            tokenizer = self.manifest["tokenizer"]
            self.entries = list(self.manifest["shards"])
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{self.manifest_path} is unreadable ({error})") from None
        if self.manifest.get("format") != prepare.FORMAT:
            raise DataError(f"{self.manifest_path} is not a {prepare.FORMAT} manifest")
        if identity is not None and identity.sha256 != tokenizer["sha256"]:
            raise DataError(
                f"{self.manifest_path}: the shards were made with the tokenizer of "
                f"{tokenizer['name']} ({tokenizer['vocab_size']} tokens, vocabulary sha256 "
                f"{tokenizer['sha256'][:12]}), not the model's ({identity}); prepare them again "
                "with --tokenizer set to the model"
            )
        for entry in self.entries:
            if vocab_size is not None and entry["max_token"] >= vocab_size:
                raise DataError(
                    f"{os.path.join(path, entry['name'])}.bin: token id {entry['max_token']} is "
                    f"outside the model's {vocab_size}-token vocabulary"
                )
        if sum(entry["tokens"] for entry in self.entries) == 0:
            raise DataError(f"{self.manifest_path}: empty corpus (no tokens)")
        self._files: dict[int, megatron.IndexedFile] = {}
        self._lock = threading.Lock()

    def shard(self, i: int) -> megatron.IndexedFile:
        """Shard i, opened; the first call in a process checks its size and sha256."""
        opened = self._files.get(i)
        if opened is not None:
            return opened
        with self._lock:
            if i not in self._files:
                entry = self.entries[i]
                prefix = os.path.join(self.path, entry["name"])
                for suffix in (".idx", ".bin"):
                    if not os.path.isfile(prefix + suffix):
                        raise DataError(f"cannot read {prefix + suffix}: No such file")
                size = os.path.getsize(prefix + ".bin")
                if size != entry["bin_bytes"]:
                    raise DataError(
                        f"{prefix}.bin: {size} bytes, its manifest entry says "
                        f"{entry['bin_bytes']}: changed or cut short since prepare_data.py"
                    )
                for suffix, key in ((".idx", "idx_sha256"), (".bin", "bin_sha256")):
                    if megatron.file_sha256(prefix + suffix) != entry[key]:
                        raise DataError(
                            f"{prefix}{suffix} does not match its sha256 in "
                            f"{self.manifest_path}: changed or damaged since prepare_data.py"
                        )
                self._files[i] = megatron.IndexedFile(prefix)
            return self._files[i]


class Blocks:
    """Random access to the blocks of a corpus (grain's RandomAccessDataSource protocol).

    With `segments`, an element is (tokens, segment ids): segment ids count the documents
    begun since the block's start (0 for the first, partial or whole), read from the shard's
    index of document boundaries (`document_starts`), so the EOS that ends a document is in
    that document's segment and the next token starts a new one."""

    def __init__(self, corpus: Corpus, block_size: int, segments: bool = False):
        self.corpus, self.block_size, self.segments = corpus, block_size, segments
        counts = [entry["tokens"] // block_size for entry in corpus.entries]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        if self._starts[-1] == 0:
            raise DataError(
                f"{corpus.manifest_path}: no shard holds one block of {block_size} tokens"
            )

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        shard = bisect.bisect_right(self._starts, index) - 1
        offset = (index - self._starts[shard]) * self.block_size
        opened = self.corpus.shard(shard)
        tokens_T = opened.read(offset, self.block_size).astype(np.int32)
        if not self.segments:
            return tokens_T
        segments_T = np.zeros(self.block_size, np.int32)
        starts = opened.document_starts(offset, self.block_size)
        np.add.at(segments_T, starts, 1)
        return tokens_T, np.cumsum(segments_T, dtype=np.int32)


def _open(
    spec: str, block_size: int, identity, vocab_size, segments: bool = False
) -> list[tuple[Blocks, float]]:
    return [
        (Blocks(Corpus(path, identity, vocab_size), block_size, segments), weight)
        for path, weight in parse_paths(spec)
    ]


def _example(block) -> dict[str, np.ndarray]:
    """A block's arrays: its tokens (and its segment ids, when `Blocks` reads them)."""
    tokens_T, segments_T = block if isinstance(block, tuple) else (block, None)
    ones = np.ones_like(tokens_T)
    example = {"tokens": tokens_T, "attention_mask": ones, "loss_mask": ones}
    if segments_T is not None:
        example["segment_ids"] = segments_T
    return example


class ShardBatches:
    """This process's rows of each global batch of a (mixed) shard corpus, through grain.

    `process_local` tells the trainer that the batches hold only this process's rows.

    Args:
      corpora: (Blocks, weight) of each corpus.
      batch_size: rows of the global batch.
      seed: the shuffle's seed.
      process_index, process_count: which rows are this process's (jax's by default).
      workers: grain's reading threads (prefetching ahead of the step).
    """

    process_local = True

    def __init__(
        self,
        corpora: list[tuple[Blocks, float]],
        batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        workers: int = 1,
    ):
        import grain

        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise DataError(
                f"data.batch_size {batch_size} does not divide over {process_count} processes"
            )
        rows = batch_size // process_count
        self._paths = [blocks.corpus.path for blocks, _ in corpora]
        # The contents (every shard's sha256, in order) and weights the position refers to.
        digest = hashlib.sha256()
        for blocks, weight in corpora:
            for entry in blocks.corpus.entries:
                digest.update(f"{entry['bin_sha256']}:{entry['idx_sha256']};".encode())
            digest.update(f"weight {weight} block {blocks.block_size}|".encode())
        self._fingerprint = digest.hexdigest()[:16]
        shuffled = [
            grain.MapDataset.source(blocks).shuffle(seed=(seed + 1000003 * k) % 2**32)
            for k, (blocks, _) in enumerate(corpora)
        ]
        if len(shuffled) == 1:
            mixed = shuffled[0]
        else:
            mixed = grain.MapDataset.mix(shuffled, [weight for _, weight in corpora])
        # An index of `mixed` past its length is a further epoch (a new permutation).
        self.batches_per_epoch = len(mixed) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(mixed)} blocks of {corpora[0][0].block_size} tokens is fewer than one "
                f"batch of {batch_size}"
            )

        def global_row(k: int) -> int:  # local row k -> its index in the global sequence
            step, row = divmod(k, rows)
            return step * batch_size + process_index * rows + row

        local = grain.MapDataset.range(_ENDLESS).map(lambda k: _example(mixed[global_row(k)]))
        self._dataset = local.batch(rows).to_iter_dataset(
            grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(2 * workers, 2))
        )
        self._iterator = iter(self._dataset)

    def state(self) -> dict[str, Any]:
        """grain's iterator state, and which shards (and weights) it is a position in."""
        return {**self._iterator.get_state(), "shards": self._fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("shards", None)
        if saved is not None and saved != self._fingerprint:
            raise DataError(
                f"the shards of data.path ({', '.join(self._paths)}) are not the ones the "
                "checkpoint's run read (re-prepared or changed since): its batches cannot be "
                "resumed; restore those shards, or train into a new --workdir"
            )
        self._iterator = iter(self._dataset)
        self._iterator.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)


def batches(cfg, tokenizer, vocab_size: int, seed: int, workers: int | None = None) -> ShardBatches:
    """The `ShardBatches` of `config.data` (name "shards", path as `parse_paths` reads it)."""
    from tsld_jax.quant import export

    identity = export.tokenizer_identity(tokenizer)
    segments = cfg.get("document_attention", False)
    corpora = _open(cfg.path, cfg.block_size, identity, vocab_size, segments)
    workers = cfg.get("workers", 1) if workers is None else workers
    return ShardBatches(corpora, cfg.batch_size, seed, workers=workers)


def eval_examples(
    path: str, block_size: int, count: int, tokenizer, vocab_size: int, segments: bool = False
):
    """The first `count` blocks (0: all) of a held-out shard set, in order, as examples (with
    "segment_ids" when `segments`: `data.document_attention`)."""
    from tsld_jax.quant import export

    identity = export.tokenizer_identity(tokenizer)
    blocks = Blocks(Corpus(path, identity, vocab_size), block_size, segments)
    n = len(blocks) if count == 0 else min(count, len(blocks))
    rows = [blocks[i] for i in range(n)]
    if segments:
        return _example(tuple(np.stack(parts) for parts in zip(*rows, strict=True)))
    return _example(np.stack(rows))

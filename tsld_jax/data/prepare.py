"""Tokenize once: text, jsonl, parquet and arrow files into Megatron token shards and a manifest.

`prepare_data.py --tokenizer MODEL --input FILES... --output DIR` calls `prepare`. Each input
file becomes one shard, `DIR/NNNNN-NAME.bin` + `.idx` (Megatron's format, `megatron.py`), with
each document's tokens followed by the EOS token; `DIR/NNNNN-NAME.json` records the finished
shard, and `DIR/manifest.json` lists them all with the tokenizer's fingerprint, the token and
document counts and the sha256 of every file.

Resumable: every file is written under a temporary name and renamed when complete
(`tsld_jax/atomic.py`), the shard's .json last, so a killed run leaves no shard that a reader
(or the next run) would take for complete; the next run skips every shard whose .json matches
its input (path, size, modification time) and the tokenizer, and a run with nothing to do
writes nothing.

Documents: a .txt file gives one document per non-empty line (`document="file"`: the whole file
is one), a .jsonl, .parquet or .arrow file (a `datasets` dump: `save_to_disk` writes .arrow,
`to_parquet`/`to_json` the others) one per record, its `text_field`. An existing Megatron
`PREFIX.idx` (with its .bin) given as input is checked and copied in as it is.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tsld_jax import atomic
from tsld_jax.data import megatron
from tsld_jax.data.sources import DataError

FORMAT = "tsld-jax token shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow", ".idx")
DOCUMENT_MODES = ("line", "file")


@dataclasses.dataclass(frozen=True)
class Options:
    """How documents are read and stored (part of each shard's key: changing one redoes it)."""

    text_field: str = "text"  # the field of a jsonl/parquet/arrow record that holds the text
    document: str = "line"  # .txt files: "line" (a document a non-empty line) or "file"
    dtype: str = "auto"  # token dtype: "auto" (uint16 when the vocabulary fits), uint16, int32
    chunk_documents: int = 256  # documents a worker tokenizes at a time


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """The input files, in order: files as given, directories walked (sorted, hidden skipped)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    os.path.join(folder, n)
                    for n in sorted(names)
                    if n.endswith(SUFFIXES) and not n.startswith(".")
                ]
            if not found:
                raise DataError(f"{path}: no {', '.join(SUFFIXES)} file in this directory")
            files += found
        elif not os.path.isfile(path):
            raise DataError(f"cannot read {path}: No such file or directory")
        elif not path.endswith(SUFFIXES):
            raise DataError(f"{path}: unknown file type; expected one of {', '.join(SUFFIXES)}")
        else:
            files.append(path)
    if not files:
        raise DataError("no input files")
    return files


def read_documents(path: str, options: Options) -> Iterator[str]:
    """The documents of one input file, streamed (a file is never read whole into memory,
    unless `document="file"` makes the whole file one document)."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                if options.document == "file":
                    text = f.read()
                    if text.strip():
                        yield text
                    return
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield _json_text(path, number, line, options.text_field)
        else:
            yield from _arrow_texts(path, options.text_field)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason})") from None


def _json_text(path: str, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: malformed JSON ({error.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path}:{number}: no field {field!r}")
    return str(record[field])


def _arrow_texts(path: str, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(path)
            if field not in parquet.schema_arrow.names:
                raise DataError(f"{path}: no column {field!r}")
            batches = parquet.iter_batches(columns=[field], batch_size=1024)
        else:  # datasets' save_to_disk writes the Arrow stream format
            try:
                reader = pa.ipc.open_stream(path)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(path)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            batches = reader
        for batch in batches:
            if field not in batch.schema.names:
                raise DataError(f"{path}: no column {field!r}")
            for text in batch.column(field).to_pylist():
                if text is not None and str(text).strip():
                    yield str(text)
    except pa.ArrowException as error:
        raise DataError(f"{path}: unreadable ({str(error).splitlines()[0]})") from None


# --- tokenizing in worker processes ----------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer: Any, eos: int | None, dtype: str, vocab_size: int) -> None:
    _WORKER.update(tokenizer=tokenizer, eos=eos, dtype=np.dtype(dtype), vocab_size=vocab_size)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids back to back, tokens per document) of a chunk of documents, each with the
    tokenizer's default special tokens and then EOS (where the tokenizer has one)."""
    encoded = _WORKER["tokenizer"](texts)["input_ids"]
    eos = _WORKER["eos"]
    if eos is not None:
        encoded = [[*ids, eos] for ids in encoded]
    lengths = np.fromiter((len(ids) for ids in encoded), np.int64, len(encoded))
    ids = np.fromiter((t for seq in encoded for t in seq), np.int64, int(lengths.sum()))
    limit = np.iinfo(_WORKER["dtype"]).max
    if ids.size and (ids.max() > limit or ids.min() < 0):
        raise OverflowError(f"token id {int(ids.max())} does not fit {_WORKER['dtype']}")
    return ids.astype(_WORKER["dtype"]), lengths


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Tokenizers:
    """`workers` processes (or this one, with 0) tokenizing chunks in order, at most a few
    chunks ahead of the writer: a Pool's imap would read a whole input file ahead into memory."""

    def __init__(self, workers: int, init_args: tuple):
        self.workers = workers
        self._pool = None
        if workers > 0:
            # spawn, not fork: the parent may hold jax's and the tokenizer's threads.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(workers, initializer=_start_worker, initargs=init_args)
        else:
            _start_worker(*init_args)

    def map(self, chunks: Iterator[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._pool is None:
            yield from map(_encode, chunks)
            return
        pending = collections.deque()
        for chunk in chunks:
            pending.append(self._pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


# --- shards and the manifest ------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any, name: str) -> dict[str, Any]:
    """The vocabulary size and sha256 (`quant.export.tokenizer_identity`, as packed files store
    them) and the EOS id of a tokenizer; `name` is recorded for the reader's messages only."""
    from tsld_jax.quant import export

    identity = export.tokenizer_identity(tokenizer)
    if identity is None:
        raise DataError(f"--tokenizer {name}: cannot fingerprint a {type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    return {
        "name": name,
        "vocab_size": identity.vocab_size,
        "sha256": identity.sha256,
        "eos_id": None if eos is None else int(eos),
    }


def _shard_name(index: int, path: str) -> str:
    stem = os.path.basename(path.rstrip(os.sep))
    for suffix in SUFFIXES:
        stem = stem.removesuffix(suffix)
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}"


def _source_key(path: str, fingerprint: dict, options: Options, dtype: str) -> dict[str, Any]:
    sources = [path, path.removesuffix(".idx") + ".bin"] if path.endswith(".idx") else [path]
    stats = [os.stat(p) for p in sources]
    return {
        "source": os.path.abspath(path),
        "source_bytes": sum(s.st_size for s in stats),
        "source_mtime_ns": max(s.st_mtime_ns for s in stats),
        "tokenizer_sha256": fingerprint["sha256"],
        "eos_id": fingerprint["eos_id"],
        "dtype": dtype,
        "text_field": options.text_field,
        "document": options.document,
    }


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent or damaged: the shard is made again


def write_shard(
    prefix: str,
    pieces: Iterable[tuple[np.ndarray, np.ndarray]],
    dtype: np.dtype,
    on_piece: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Writes PREFIX.bin and PREFIX.idx (each through `atomic`, the .bin first) from pieces of
    (token ids back to back, tokens per document); returns the shard's counts and .bin sha256.
    `on_piece(documents, tokens so far)` follows the progress."""
    with atomic.replacing(f"{prefix}.bin") as temporary, open(temporary, "wb") as f:
        writer = megatron.BinWriter(f, dtype)
        for ids, lengths in pieces:
            writer.add(ids, lengths)
            if on_piece is not None:
                on_piece(len(lengths), writer.tokens)
    with atomic.replacing(f"{prefix}.idx") as temporary:
        megatron.write_index(temporary, np.asarray(writer.lengths, np.int64), dtype)
    return {
        "documents": len(writer.lengths),
        "tokens": writer.tokens,
        "max_token": writer.max_token,
        "bin_sha256": writer.sha256.hexdigest(),
    }


def _write_tokens(
    path: str,
    prefix: str,
    options: Options,
    dtype: np.dtype,
    tokenizers: _Tokenizers,
    progress: bool,
) -> dict[str, Any]:
    # disable=None: a bar on a terminal only, never in a log file.
    bar = tqdm(
        desc=os.path.basename(path), unit=" docs", disable=None if progress else True, leave=False
    )

    def update(documents: int, tokens: int) -> None:
        bar.update(documents)
        bar.set_postfix(tokens=tokens)

    chunks = _chunks(read_documents(path, options), options.chunk_documents)
    try:
        return write_shard(prefix, tokenizers.map(chunks), dtype, update)
    except OverflowError as error:
        raise DataError(f"{path}: {error}; prepare with --dtype int32") from None
    finally:
        bar.close()


def shard_entry(name: str, key: dict[str, Any], dtype: np.dtype, counts: dict, prefix: str):
    """The manifest entry of a finished shard (also written to PREFIX.json, last)."""
    return {
        "name": name,
        "key": key,
        "dtype": np.dtype(dtype).name,
        **counts,
        "idx_sha256": megatron.file_sha256(prefix + ".idx"),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
    }


def write_manifest(output: str, fingerprint: dict[str, Any], shards: list[dict]) -> bool:
    """Writes OUTPUT/manifest.json (through `atomic`) unless it already says the same; returns
    whether it wrote. An empty corpus is an error naming the inputs."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": fingerprint,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    path = os.path.join(output, MANIFEST)
    if _read_json(path) == manifest:
        return False
    atomic.write_json(path, manifest, indent=1)
    return True


def _copy_megatron(path: str, prefix: str, vocab_size: int) -> dict[str, Any]:
    source = megatron.IndexedFile(path.removesuffix(".idx"))
    if source.dtype.kind not in "iu":
        raise DataError(f"{source.idx_path}: tokens of dtype {source.dtype}, expected integers")
    max_token = -1
    for start in range(0, source.num_tokens, 1 << 24):
        max_token = max(max_token, int(np.max(source.tokens[start : start + (1 << 24)])))
    if max_token >= vocab_size:
        raise DataError(
            f"{source.bin_path}: token id {max_token} is outside the tokenizer's "
            f"{vocab_size}-token vocabulary: made with another tokenizer"
        )
    for suffix, origin in ((".bin", source.bin_path), (".idx", source.idx_path)):
        with atomic.replacing(prefix + suffix) as temporary:
            shutil.copyfile(origin, temporary)
    return {
        "documents": source.num_documents,
        "tokens": source.num_tokens,
        "max_token": max_token,
        "bin_sha256": megatron.file_sha256(prefix + ".bin"),
        "dtype": str(source.dtype),
    }


def prepare(
    inputs: Sequence[str],
    output: str,
    tokenizer: Any,
    tokenizer_name: str,
    *,
    workers: int = 1,
    options: Options = Options(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenizes `inputs` into shards in `output` (see the module docstring); returns the
    manifest. Shards already made from the same input and tokenizer are kept as they are.

    Raises:
      DataError: (one line naming the file) an unreadable or malformed input, a vocabulary too
        large for the token dtype, an empty corpus.
    """
    if options.document not in DOCUMENT_MODES:
        raise DataError(f"unknown document mode {options.document!r}; expected {DOCUMENT_MODES}")
    files = expand_inputs(inputs)
    fingerprint = tokenizer_fingerprint(tokenizer, tokenizer_name)
    vocab_size = fingerprint["vocab_size"]
    if options.dtype == "auto":
        dtype = megatron.token_dtype(vocab_size)
    elif options.dtype in megatron.TOKEN_DTYPES:
        dtype = np.dtype(options.dtype)
        if vocab_size - 1 > np.iinfo(dtype).max:
            raise DataError(
                f"--tokenizer {tokenizer_name}: a vocabulary of {vocab_size} tokens does not "
                f"fit {dtype} (ids up to {np.iinfo(dtype).max}); use --dtype int32"
            )
    else:
        raise DataError(f"unknown --dtype {options.dtype!r}; expected auto or one of uint16, int32")
    os.makedirs(output, exist_ok=True)
    shards, made = [], 0
    tokenizers = None
    init = (tokenizer, fingerprint["eos_id"], dtype.name, vocab_size)
    try:
        for index, path in enumerate(files):
            name = _shard_name(index, path)
            prefix = os.path.join(output, name)
            key = _source_key(path, fingerprint, options, dtype.name)
            done = _read_json(prefix + ".json")
            if done is not None and done.get("key") == key and _files_present(prefix, done):
                shards.append(done)
                continue
            if path.endswith(".idx"):
                counts = _copy_megatron(path, prefix, vocab_size)
            else:
                if tokenizers is None:
                    tokenizers = _Tokenizers(workers, init)
                counts = _write_tokens(path, prefix, options, dtype, tokenizers, progress)
            entry = shard_entry(name, key, dtype, counts, prefix)
            atomic.write_json(prefix + ".json", entry, indent=1)  # last: the shard is complete
            shards.append(entry)
            made += 1
            log(f"{name}: {entry['documents']} documents, {entry['tokens']} tokens from {path}")
    finally:
        if tokenizers is not None:
            tokenizers.close()
    if sum(s["tokens"] for s in shards) == 0:
        raise DataError(f"empty corpus: no document in {', '.join(files)}")
    if not write_manifest(output, fingerprint, shards) and made == 0:
        log(f"{output}: all {len(shards)} shards are up to date; nothing to do")
    return _read_json(os.path.join(output, MANIFEST))


def _files_present(prefix: str, entry: dict[str, Any]) -> bool:
    # Only sizes here (a checksum of every shard would make the no-op run read the corpus);
    # the reader checks the sha256 when it first reads a shard.
    try:
        return os.path.getsize(prefix + ".bin") == entry["bin_bytes"] and os.path.exists(
            prefix + ".idx"
        )
    except (OSError, KeyError):
        return False

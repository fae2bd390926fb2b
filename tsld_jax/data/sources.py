"""Reading data files (local files laid out like `shared/data`, or the hub), for training and
for evaluation alike.

Every problem with the data is raised as `DataError` with a one-line message naming the file
(and line), so that `train.py`, `eval.py` and `prepare_data.py` can print it and exit with
status 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


class DataError(ValueError):
    """Missing, unreadable, malformed or too-short data."""


__all__ = ["DataError", "hub_records", "local_path", "read_jsonl", "read_lines", "read_tsv"]


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (without their line ends)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason})") from None


def read_jsonl(path: str, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; each must hold the `required` keys."""
    records = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        missing = [key for key in required if key not in record]
        if missing:
            raise DataError(f"{path}:{number}: missing field {missing[0]!r}")
        records.append(record)
    return records


def read_tsv(path: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """A tab-separated file with a header row naming (at least) `columns`."""
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path} is empty")
    header = lines[0].split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: header has no column {missing[0]!r}")
    records = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} columns, got {len(cells)}")
        records.append(dict(zip(header, cells, strict=True)))
    return records


def hub_records(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """A split of a Hugging Face dataset as a list of dicts (used when --data-dir is not given)."""
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, split=split)
    except Exception as error:
        raise DataError(
            f"cannot load {path}{'/' + name if name else ''} ({split}) from the hub "
            f"({type(error).__name__}); pass --data-dir with a local copy when offline"
        ) from None
    return [dict(record) for record in dataset]


def local_path(data_dir: str, relative: str) -> str:
    """`data_dir/relative`, or a DataError naming it when it does not exist."""
    path = os.path.join(data_dir, relative)
    if not os.path.exists(path):
        raise DataError(f"cannot read {path}: No such file or directory")
    return path

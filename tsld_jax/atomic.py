"""Writes that cannot lose anything: the new output is written under a temporary name beside
its destination and renamed into place only once complete.

A kill, a full disk or an exception in the middle of a write therefore leaves the old output
(or nothing, where there was none) and at most a hidden `.NAME.*.tmp` beside it, never a
partial file at NAME. Every file or directory the command lines write for a user (exports,
`eval.py --output`, `train.py --plan-json`, a run's config.json, results.json, curves.png,
generated_*.npz and the fp stage's export/) goes through `replacing`.

Its own module rather than a function in `workdir.py` or `cli_errors.py`: export, evaluation and
training all write through it, and none of them should import another's helpers for this.
Hand-written rather than `tempfile.mkstemp`/`mkdtemp`, which create 0600/0700 entries: a result
or an export made private that way would be unreadable by the user's group, unlike the same
file written in place, while `os.open`/`os.mkdir` with 0666/0777 honour the umask as `open` does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

# A name is at most 255 bytes; the temporary adds a prefix and a suffix to the destination's.
_MAX_BASE = 200


def _beside(path: str, suffix: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base[:_MAX_BASE]}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync(path: str) -> None:
    # Without it, a power loss soon after the rename may show the new name with no data in it.
    # Some file systems refuse fsync on a directory (EINVAL); the rename is still atomic there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    if not os.path.isdir(path):
        _fsync(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _swap_in(temporary: str, path: str) -> None:
    """Renames the finished directory `temporary` onto `path`, whatever is there now.

    POSIX cannot rename a directory over a non-empty one, so the old entry is first renamed
    aside, then the new one in, and only then is the old one removed. A kill between the two
    renames (two system calls) leaves the old output complete under `.NAME.*.old` beside it.
    """
    if not os.path.lexists(path):
        os.rename(temporary, path)
        return
    aside = _beside(path, ".old")
    os.rename(path, aside)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove(aside)


@contextlib.contextmanager
def replacing(path: str, *, directory: bool = False) -> Iterator[str]:
    """Yields a temporary path beside `path` for the body to write; once the body ends without
    an exception, renames it onto `path`, replacing what was there.

    The temporary exists when the body starts (an empty file, or an empty directory with
    `directory=True`), so a writer that takes a path can be handed it as is. A symbolic link at
    `path` is replaced by the new output; its target is left alone.

    Args:
      path: the file or directory to write.
      directory: the output is a directory (swapped in whole: nothing of the old one remains).

    Yields:
      The temporary path to write.

    Raises:
      Whatever the body raises (KeyboardInterrupt included), after removing the temporary; the
      old output is then untouched. OSError from the rename itself (e.g. `path` is a directory
      and `directory` is False).
    """
    temporary = _beside(path, ".tmp")
    if directory:
        os.mkdir(temporary, 0o777)
    else:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        _fsync_tree(temporary)
        if directory:
            _swap_in(temporary, path)
        else:
            os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
    """Writes `text` to the file `path` through `replacing`."""
    with replacing(path) as temporary, open(temporary, "w") as f:
        f.write(text)


def write_json(path: str, payload: Any, **dump_args: Any) -> None:
    """Writes `payload` as JSON (`json.dump` with `dump_args`) through `replacing`."""
    with replacing(path) as temporary, open(temporary, "w") as f:
        json.dump(payload, f, **dump_args)


# errno values of a write that failed because of the place: read-only, full, forbidden.
WRITE_ERRNOS = frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}
)

# How libraries written in C++ or Rust report a failed write: the OS error's text and errno (and,
# for tensorstore through orbax, the file) inside a ValueError/RuntimeError/SafetensorError
# message; the OSError itself never reaches Python.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")
_FAILED_FILE = re.compile(r'(?:Failed writing|local file): "([^"]+)"')


def os_error_in(error: BaseException, default_path: str) -> OSError | None:
    """The OSError of a failed write that `error` (an orbax/tensorstore or safetensors failure,
    or anything raised from one) reports, with the file it names; None if it reports none.

    Args:
      error: what the save raised.
      default_path: the file to name when the error names none.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return OSError(seen.errno, seen.strerror, seen.filename or default_path)
        match = _OS_ERROR_CODE.search(str(seen))
        code = int(match.group(1) or match.group(2)) if match else None
        if code in WRITE_ERRNOS:
            found = _FAILED_FILE.search(str(seen))
            return OSError(code, os.strerror(code), found.group(1) if found else default_path)
        seen = seen.__cause__ or seen.__context__
    return None

"""One workdir, one run: the checks a workdir passes before a run starts, and its lock.

The lock is `WORKDIR/train.lock`. The run holds an exclusive `flock` on it for its whole life
and writes into it who holds it: `{"pid", "host", "started"}`. A new run decides so:

- `flock` is refused: a live run holds the lock (the kernel, or on NFS the lock server, says so):
  refuse at once with one line naming the holder.
- `flock` succeeds and the file names a holder on this host: that process is gone (the kernel
  drops a dead process's `flock`), so the lock is stale: take it over with a warning.
- `flock` succeeds and the holder is on another host: some shared filesystems do not share
  `flock`s between hosts, so trust the holder's heartbeat instead (a thread of the holding run
  touches the file every `HEARTBEAT_S`). Older than `STALE_AFTER_S`: stale, taken over with a
  warning; fresher: refuse, with the hint to remove the file if that run is truly gone.

On a filesystem without `flock` at all, a holder on this host is alive while its pid is.
The file is never deleted (deleting a locked file lets two runs lock two different inodes); a
run that ends empties it, and an empty file is a free lock. Its content is written only by the
process that holds the `flock`; a reader that catches a half-written file reads it again.
With several processes (`jax.process_count() > 1`) only process 0 takes the lock, and tells the
others whether it got it, so that no process waits in a collective for one that gave up.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time

from tsld_jax import atomic

LOCK_NAME = "train.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

# errno values of a workdir that cannot be written (as opposed to, say, missing input data).
WRITE_ERRNOS = atomic.WRITE_ERRNOS


class WorkdirError(RuntimeError):
    """A workdir a run cannot use: a file, not writable, held by another run, another run's."""


class WriteFailure(WorkdirError):
    """A workdir that stopped taking writes in the middle of a run (read-only, full, removed).

    The process that raised it may still have checkpoint threads waiting on writes that will
    never land (see train.py, which does not wait for them at exit).
    """


def prepare(workdir: str) -> None:
    """Creates the workdir and checks that it is a writable directory, before any real work.

    Raises:
      WorkdirError: with one line saying what is wrong.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir}: cannot create it ({error.strerror})") from None
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir} is not writable ({error.strerror})") from None


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def _read_holder(fd: int) -> dict | None:
    """The holder the lock file names; None when it is empty; {} when it cannot be parsed."""
    for _ in range(10):
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            time.sleep(0.05)  # Caught mid-write by its holder: read again.
    return {}


class Lock:
    """A held workdir lock; `release()` (or leaving the `with`) frees it."""

    def __init__(self, path: str, fd: int, heartbeat_s: float):
        self.path = path
        self._fd = fd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):  # A read-only workdir: the run reports it.
                os.utime(self._fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        self._stop.set()
        with contextlib.suppress(OSError):  # Empty means free; the kernel drops the flock anyway.
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # Closing the last descriptor releases the flock.
        self._fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(
    workdir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S
) -> Lock:
    """Takes the workdir's lock, or raises WorkdirError naming the run that holds it.

    Args:
      workdir: an existing, writable directory (see `prepare`).
      stale_after_s: for a holder on another host, the heartbeat age past which it is gone.
      heartbeat_s: how often the holder touches the lock file.
    """
    path = os.path.join(workdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir} is not writable ({error.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:
            # A filesystem without flock: judge by the holder's pid (this host) or heartbeat.
            holder = _read_holder(fd) or {}
            held = holder.get("host") == _host() and _pid_alive(holder.get("pid"))
        if held:
            holder = _read_holder(fd) or {}
            raise WorkdirError(
                f"--workdir {workdir} is in use by another train.py run ({_describe(holder)}); "
                "one workdir, one run: wait for it, stop it, or pass another --workdir"
            )
        holder = _read_holder(fd)
        if holder is not None:
            age = time.time() - os.fstat(fd).st_mtime
            if holder.get("host") not in (None, _host()) and age < stale_after_s:
                raise WorkdirError(
                    f"--workdir {workdir} may be in use by a run on another host "
                    f"({_describe(holder)}; its heartbeat is {age:.0f} s old); if that run is "
                    f"gone, remove {path}"
                )
            message = (
                f"taking over the lock of a run that is gone ({_describe(holder)}; "
                f"heartbeat {age:.0f} s old)"
            )
            print(f"warning: {message}", file=sys.stderr)
        me = {
            "pid": os.getpid(),
            "host": _host(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return Lock(path, fd, heartbeat_s)


@contextlib.contextmanager
def hold(workdir: str):
    """Prepares the workdir and holds its lock for the body (only process 0 locks).

    Yields:
      The Lock, or None on processes other than 0.
    """
    import jax

    if jax.process_count() == 1:
        prepare(workdir)
        with acquire(workdir) as lock:
            yield lock
        return
    from jax.experimental import multihost_utils

    lock, failure = None, None
    if jax.process_index() == 0:
        try:
            prepare(workdir)
            lock = acquire(workdir)
        except WorkdirError as error:
            failure = error
    # Every process takes part, so none waits for a process 0 that gave up.
    ok = int(multihost_utils.broadcast_one_to_all(int(failure is None)))
    if failure is not None:
        raise failure
    if not ok:
        raise WorkdirError(f"--workdir {workdir}: process 0 could not take it (see its log)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def is_write_failure(error: BaseException, workdir: str) -> bool:
    """Whether `error` is a failure to write into `workdir` (read-only, full, removed)."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return False
    if not error.filename:
        return False
    root = os.path.abspath(workdir)
    return os.path.abspath(str(error.filename)).startswith(root + os.sep)

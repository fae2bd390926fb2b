"""One workdir, one run: the lock (held, stale, another host, multihost), and a workdir that is
a file, not writable, or goes read-only mid-run, each one line and exit code 2, nothing lost."""

import json
import os
import signal
import subprocess
import time

import checkpoint_test
import jax
import pytest
import train_test

from tsld_jax import checkpoint, cli_errors, recipe, trainer, workdir

LOCK = workdir.LOCK_NAME


def _write_holder(directory, **holder):
    (directory / LOCK).write_text(json.dumps({"pid": 1, "started": "then", **holder}))


# --- the lock, in one process ---------------------------------------------------------------


def test_a_held_lock_refuses_and_a_released_one_is_free(tmp_path):
    with workdir.acquire(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and {"host", "started"} <= set(holder)
        # flock locks belong to an open file, so a second open in this process is refused too.
        with pytest.raises(workdir.WorkdirError) as error:
            workdir.acquire(str(tmp_path))
    assert f"in use by another train.py run (pid {os.getpid()} on host" in str(error.value)
    assert (tmp_path / LOCK).read_text() == ""
    with workdir.acquire(str(tmp_path)):
        pass


def test_a_lock_left_on_this_host_is_taken_over(tmp_path, capsys):
    _write_holder(tmp_path, host=workdir._host(), pid=123456)
    with workdir.acquire(str(tmp_path)):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over the lock of a run that is gone (pid 123456" in capsys.readouterr().err


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path, capsys):
    _write_holder(tmp_path, host="elsewhere")
    with pytest.raises(workdir.WorkdirError, match=f"if that run is gone, remove .*{LOCK}"):
        workdir.acquire(str(tmp_path))
    os.utime(tmp_path / LOCK, (time.time() - 2 * workdir.STALE_AFTER_S,) * 2)
    with workdir.acquire(str(tmp_path)):
        pass
    assert "taking over the lock" in capsys.readouterr().err


def test_without_flock_a_live_pid_on_this_host_holds(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    _write_holder(tmp_path, host=workdir._host(), pid=os.getppid())
    with pytest.raises(workdir.WorkdirError, match=f"in use .*pid {os.getppid()}"):
        workdir.acquire(str(tmp_path))
    _write_holder(tmp_path, host=workdir._host(), pid=2**22 + 7)  # above pid_max: not alive
    with workdir.acquire(str(tmp_path)):
        pass
    assert "taking over the lock" in capsys.readouterr().err


def test_the_heartbeat_touches_the_lock(tmp_path):
    with workdir.acquire(str(tmp_path), heartbeat_s=0.05):
        os.utime(tmp_path / LOCK, (0, 0))
        time.sleep(0.5)
        assert time.time() - os.stat(tmp_path / LOCK).st_mtime < 5


def test_only_process_0_locks(tmp_path, monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
    with workdir.hold(str(tmp_path)) as lock:
        assert lock is None and not (tmp_path / LOCK).exists()


def test_file_workdir_stops_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(recipe, "load_models", never)
    path = tmp_path / "file"
    path.write_text("mine")
    cfg = checkpoint_test._smoke_config()
    # A mesh that fits the suite's 8 fake devices (the mesh is checked before the workdir).
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with cli_errors.one_line_errors() as outcome:
        trainer.train_and_evaluate(cfg, str(path))
    assert outcome.code == 2 and path.read_text() == "mine"
    assert capsys.readouterr().err == f"error: --workdir {path} is a file, not a directory\n"


# --- real processes -------------------------------------------------------------------------


def _popen(workdir_path, shared_data, *flags, prefix=()):
    return subprocess.Popen(
        [*prefix, *train_test._command(workdir_path, shared_data, *flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=train_test.ROOT,
        env=train_test._env(),
    )


def _logged_steps(directory):
    metrics = directory / "metrics.jsonl"
    return sum('"loss"' in line for line in open(metrics)) if metrics.exists() else 0


def _wait_for_steps(directory, count, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _logged_steps(directory) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.3)
    raise AssertionError(f"no {count} steps in {timeout} s")


def _error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


LONG = ("--config.train.steps=100000", "--config.checkpoint.every_steps=2")


def test_two_runs_one_workdir(tmp_path, shared_data):
    first = _popen(tmp_path, shared_data, *LONG)
    try:
        _wait_for_steps(tmp_path, 3, first)
        # A second run on the same workdir refuses at once, naming the holder.
        started = time.time()
        second = train_test._train(tmp_path, shared_data, *LONG)
        assert second.returncode == 2
        line = _error_line(second.stderr)
        assert f"in use by another train.py run (pid {first.pid} on host" in line, line
        assert time.time() - started < 120
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    saved = checkpoint.saved_steps(str(tmp_path))
    assert saved
    # The killed run's lock is taken over with a warning; a may-change field is logged.
    logged = _logged_steps(tmp_path)
    third = _popen(tmp_path, shared_data, *LONG, "--config.log.every_steps=2")
    try:
        _wait_for_steps(tmp_path, logged + 1, third)
    finally:
        third.send_signal(signal.SIGTERM)
        out, err = third.communicate(timeout=300)
    assert f"taking over the lock of a run that is gone (pid {first.pid} on host" in err
    assert "resuming with changed settings: log.every_steps 1 -> 2" in out
    assert f"resuming from step {saved[-1]}" in out and "checkpoint" in err and "saved in" in err
    assert third.returncode in (0, 128 + signal.SIGTERM), err[-3000:]
    assert (tmp_path / LOCK).read_text() == ""  # released
    # A run with another identity stops with one line, before touching anything.
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = train_test._train(tmp_path, shared_data, *LONG, "--config.loss.kind=logit")
    assert other.returncode == 2
    line = _error_line(other.stderr)
    assert "holds checkpoints of another run" in line and "loss.kind 'tsld' -> 'logit'" in line
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_file_workdir_from_the_command_line(tmp_path, shared_data):
    path = tmp_path / "file"
    path.write_text("mine")
    result = train_test._train(path, shared_data)
    assert result.returncode == 2 and path.read_text() == "mine"
    assert _error_line(result.stderr) == f"error: --workdir {path} is a file, not a directory"


def _namespace_prefix(directory, read_only):
    # Permission bits do not stop root: a bind mount in a private mount namespace does.
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs root with unshare -m to make a read-only mount")
    options = "-o ro " if read_only else ""
    mount = f'mount --bind {options}"{directory}" "{directory}"'
    return ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh"]


def test_read_only_workdir_at_start(tmp_path, shared_data):
    (tmp_path / "notes.txt").write_text("mine")
    result = subprocess.run(
        [*_namespace_prefix(tmp_path, True), *train_test._command(tmp_path, shared_data)],
        capture_output=True,
        text=True,
        cwd=train_test.ROOT,
        env=train_test._env(),
        timeout=600,
    )
    assert result.returncode == 2
    assert _error_line(result.stderr) == (
        f"error: --workdir {tmp_path} is not writable (Read-only file system)"
    )
    assert os.listdir(tmp_path) == ["notes.txt"]


def _make_read_only(pid, path):
    # Bind the path onto itself in the run's mount namespace, then remount that bind read-only.
    # The kernel refuses the remount (EBUSY) while a file is open for writing through the new
    # bind, which a checkpoint save in between does: CI saw `mount --bind -o ro`, which makes the
    # two calls at once, fail so. The remount is tried again until no write is in flight.
    enter = ["nsenter", "-t", str(pid), "-m", "mount"]
    subprocess.run([*enter, "--bind", str(path), str(path)], check=True)
    for _ in range(100):
        remount = subprocess.run([*enter, "-o", "remount,bind,ro", str(path)], capture_output=True)
        if remount.returncode == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"could not remount {path} read-only: {remount.stderr.decode()}")


@pytest.mark.parametrize("target", ["workdir", "checkpoints"])
def test_workdir_goes_read_only_mid_run(target, tmp_path, shared_data):
    # The read-only mount goes on top of the live run's workdir (or only its checkpoints/, so
    # that the checkpoint save is what fails): every new open for writing fails with EROFS, as
    # on a filesystem remounted read-only after an error.
    process = _popen(tmp_path, shared_data, *LONG, prefix=_namespace_prefix(tmp_path, False))
    try:
        _wait_for_steps(tmp_path, 5, process)
        _make_read_only(process.pid, tmp_path if target == "workdir" else tmp_path / "checkpoints")
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]  # the machine, not the input (before: 2)
    line = _error_line(err)
    kept = checkpoint.saved_steps(str(tmp_path))[-1]
    assert line.startswith(f"error: --workdir {tmp_path} is no longer writable (Read-only file")
    assert f"the last checkpoint kept is step {kept} ({tmp_path}/checkpoints/{kept})" in line
    # What is on disk is intact: the named checkpoint restores, metrics.jsonl parses.
    _, step = train_test._final_params(tmp_path)
    assert step == kept
    assert all(json.loads(line) for line in open(tmp_path / "metrics.jsonl"))


def test_write_failures_are_told_from_other_errors(tmp_path):
    import errno

    inside = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "metrics.jsonl"))
    assert workdir.is_write_failure(inside, str(tmp_path))
    outside = OSError(errno.EACCES, "Permission denied", "/elsewhere/ptb.train.txt")
    assert not workdir.is_write_failure(outside, str(tmp_path))
    missing = FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "x"))
    assert not workdir.is_write_failure(missing, str(tmp_path))
    message = str(checkpoint.write_failure(str(tmp_path), inside))
    assert "(Read-only file system: " in message and "no checkpoint was saved yet" in message

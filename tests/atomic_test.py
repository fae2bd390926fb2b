"""atomic.replacing: the old output or the new one, never a part of either, and nothing left
behind but the destination."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tsld_jax import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old export " * 1000)
    return path


def _old_directory(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "config.json").write_text('{"old": true}')
    (path / "model.safetensors").write_bytes(b"old weights")
    return path


def _tree(path):
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _write(temporary, directory):
    if directory:
        with open(os.path.join(temporary, "model.safetensors"), "wb") as f:
            f.write(b"new weights")
    else:
        with open(temporary, "wb") as f:
            f.write(b"new export")


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_new_output_replaces_the_old_whole(tmp_path, directory):
    path = _old_directory(tmp_path) if directory else _old_file(tmp_path)
    with atomic.replacing(str(path), directory=directory) as temporary:
        assert os.path.dirname(temporary) == str(tmp_path)  # beside it: a rename, not a copy
        _write(temporary, directory)
    # A directory is swapped whole: nothing of the old one (its config.json) remains.
    assert _tree(path) == ({"model.safetensors": b"new weights"} if directory else b"new export")
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt])
@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_a_writer_failing_midway_leaves_the_old_output_byte_identical(tmp_path, directory, error):
    path = _old_directory(tmp_path) if directory else _old_file(tmp_path)
    before = _tree(path)
    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        with atomic.replacing(str(path), directory=directory) as temporary:
            _write(temporary, directory)
            raise error
    assert _tree(path) == before
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic.write_json(str(tmp_path / "new.json"), {"x": object()})
    assert os.listdir(tmp_path) == []


def test_new_files_follow_the_umask_as_open_does(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(str(tmp_path / "a.json"), "{}")
        with atomic.replacing(str(tmp_path / "d"), directory=True) as temporary:
            _write(temporary, True)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644  # mkstemp would give 0600
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o755


def test_a_link_is_replaced_and_its_target_kept(tmp_path):
    target = _old_file(tmp_path)
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    atomic.write_text(str(link), "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert target.read_bytes() == b"old export " * 1000


def test_a_file_cannot_replace_a_directory(tmp_path):
    path = _old_directory(tmp_path)
    with pytest.raises(IsADirectoryError):
        atomic.write_text(str(path), "new")
    assert _tree(path)["config.json"] == b'{"old": true}'
    assert os.listdir(tmp_path) == [path.name]


# A writer that has written part of its output when the signal comes.
_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tsld_jax import atomic
    with atomic.replacing({path!r}) as temporary:
        with open(temporary, "wb") as f:
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_kill_midway_leaves_the_old_file_byte_identical(tmp_path, signum):
    path = _old_file(tmp_path)
    before = path.read_bytes()
    code = _SLOW_WRITER.format(root=ROOT, path=str(path))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signum)
        assert process.wait(timeout=60) == -signum
    finally:
        process.kill()
        process.stdout.close()
    assert path.read_bytes() == before
    # The killed process could not clean up: only its hidden temporary is left beside.
    left = sorted(set(os.listdir(tmp_path)) - {path.name})
    assert len(left) == 1 and left[0].startswith(".out.bin.") and left[0].endswith(".tmp")

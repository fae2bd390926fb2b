"""export.py never loses anything: it writes atomically, never over its inputs or a run, and
replaces an existing output only with --overwrite (docs/errors.md, issue 27).

Models here are saved without PyTorch (tiny_models.save_numpy); export_gguf_test.py checks
what the exports contain.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import tiny_models
from errors_test import _snapshot  # one definition of the folder fingerprint

from tsld_jax import export_cli
from tsld_jax.models import gguf_export, hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun " * 8


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # no need for conftest's eight fake devices
    return env


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A GPT-2 model directory with a BPE tokenizer, and its GGUF export."""
    root = tmp_path_factory.mktemp("sources")
    model = str(root / "model")
    tiny_models.save_numpy("gpt2", model, vocab_size=300)
    tiny_models.save_bpe_tokenizer(model, TEXT, 300)
    gguf_file = str(root / "model.gguf")
    export_cli.export(export_cli.model_source(model), "gguf-f32", gguf_file)
    return {"model": model, "gguf": gguf_file}


@pytest.fixture
def place(tmp_path, sources):
    """A fresh copy of the sources and a fake run (another run's checkpoint and config) under
    tmp_path, which no refused export may change."""
    import shutil

    shutil.copytree(sources["model"], tmp_path / "model")
    shutil.copy(sources["gguf"], tmp_path / "model.gguf")
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "checkpoints" / "4" / "state").write_bytes(b"weights")
    config = {"model": {"name_or_path": str(tmp_path / "model")}, "train": {"steps": 4}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text('{"step": 4, "eval_ppl": 12.5}\n')
    (tmp_path / "link.gguf").symlink_to(tmp_path / "model.gguf")
    return tmp_path


def _export(*flags):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "export.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=600,
    )


def _one_error(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# {tmp} is the test's folder, {model} a model directory, {gguf} a GGUF file and {run} a fake
# run started from {model}. Each row is refused with and without --overwrite.
REFUSED = {
    # Before: Bus error (exit 135), nothing printed, the source destroyed.
    "gguf_onto_itself": ("--model {gguf} --format gguf-f16 --output {gguf}", "is the input file"),
    "gguf_through_a_link": (
        "--model {gguf} --format gguf-f16 --output {tmp}/link.gguf",
        "is the input file",
    ),
    "gguf_through_dotdot": (
        "--model {gguf} --format gguf-q8_0 --output {tmp}/run/../model.gguf",
        "is the input file",
    ),
    # Before: exit 0, the float weights replaced by ternary ones.
    "hf_onto_its_model": (
        "--model {model} --quant twn --format hf --output {model}",
        "is the source model's directory",
    ),
    "packed_onto_a_file_of_its_model": (
        "--model {model} --quant twn --format packed --output {model}/model.safetensors",
        "would replace a file of the source model's directory",
    ),
    "hf_onto_the_folder_holding_its_model": (
        "--model {model} --format hf --output {tmp}",
        "holds the source model's directory",
    ),
    # Before: exit 0, the run's config.json replaced; neither eval.py nor a resume took the run.
    "hf_onto_its_run": ("--checkpoint {run} --format hf --output {run}", "is the run --checkpoint"),
    "gguf_onto_its_runs_config": (
        "--checkpoint {run} --format gguf-f16 --output {run}/config.json",
        "is part of the train.py run",
    ),
    "hf_onto_the_model_its_run_started_from": (
        "--checkpoint {run} --format hf --output {model}",
        "is the model the run started from",
    ),
    "hf_onto_another_run": ("--model {model} --format hf --output {run}", "holds a train.py run"),
    "gguf_into_another_runs_checkpoints": (
        "--model {model} --format gguf-f32 --output {run}/checkpoints/4/state",
        "is part of the train.py run",
    ),
    "hf_onto_another_runs_checkpoints": (
        "--model {model} --format hf --output {run}/checkpoints",
        "is part of the train.py run",
    ),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_output_onto_an_input_or_a_run_is_refused(case, overwrite, place, capsys):
    flags, expected = REFUSED[case]
    names = dict(tmp=place, model=place / "model", gguf=place / "model.gguf", run=place / "run")
    argv = [flag.format(**names) for flag in flags.split()] + ["--overwrite"] * overwrite
    before = _snapshot(place)
    if "{gguf}" in flags:
        # In a process of its own: the code before could die of SIGBUS writing over its mapped
        # input (as the issue saw with SmolLM2).
        result = _export(*argv)
        assert result.returncode == 2, result.stderr[-3000:]
        error = _one_error(result)
    else:
        assert export_cli.main(argv) == 2
        error = _one_error(subprocess.CompletedProcess(argv, 2, "", capsys.readouterr().err))
    assert error.startswith("error: --output ") and expected in error, error
    assert _snapshot(place) == before
    assert sorted(os.listdir(place)) == ["link.gguf", "model", "model.gguf", "run"]


@pytest.mark.parametrize("fmt", ["hf", "packed", "gguf-tq2_0"])
def test_an_existing_output_is_replaced_only_with_overwrite(fmt, place, capsys):
    name = "out" if fmt == "hf" else "out.bin"
    output = place / "exports" / name
    output.parent.mkdir()
    argv = ["--model", str(place / "model"), "--quant", "twn", "--format", fmt]
    argv += ["--output", str(output)]
    assert export_cli.main(argv) == 0
    first = sorted(_snapshot(output.parent))
    if fmt == "hf":
        (output / "stray.txt").write_text("from the earlier export")
    earlier = _snapshot(output.parent)
    capsys.readouterr()
    assert export_cli.main(argv) == 2  # before: exit 0, silently replaced
    error = capsys.readouterr().err.strip()
    assert error == f"error: --output {output} exists; pass --overwrite to replace it"
    assert _snapshot(output.parent) == earlier
    inode = os.stat(output).st_ino
    assert export_cli.main([*argv, "--overwrite"]) == 0
    # Replaced whole (a new file or directory renamed in): nothing of the earlier one is kept.
    assert os.stat(output).st_ino != inode
    assert sorted(_snapshot(output.parent)) == first
    assert os.listdir(output.parent) == [name]


def test_an_hf_export_goes_into_an_empty_folder_but_never_replaces_a_non_model(place, capsys):
    empty = place / "empty"
    empty.mkdir()
    base = ["--model", str(place / "model"), "--format", "hf", "--output"]
    assert export_cli.main([*base, str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()
    notes = place / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    capsys.readouterr()
    assert export_cli.main([*base, str(notes), "--overwrite"]) == 2
    assert "is a directory that is not a model (no config.json)" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt", ["hf", "packed", "gguf-f16"])
def test_a_writer_failing_midway_keeps_the_earlier_export(fmt, place, monkeypatch):
    output = place / ("out" if fmt == "hf" else "out.bin")
    source = export_cli.model_source(str(place / "model"), "twn")
    export_cli.export(source, fmt, str(output))
    before = _snapshot(place)

    def full_disk(path, *args, **kwargs):
        # Writes part of its output, then the disk is full.
        with open(os.path.join(path, "config.json") if fmt == "hf" else path, "w") as f:
            f.write("{")
        raise OSError(28, "No space left on device")

    if fmt == "hf":
        monkeypatch.setattr(hf, "save_hf", full_disk)
    elif fmt == "packed":
        from tsld_jax.quant import export

        monkeypatch.setattr(export, "save_packed", full_disk)
    else:
        monkeypatch.setattr(gguf_export, "write_gguf", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_cli.export(source, fmt, str(output))
    assert _snapshot(place) == before  # before: a partial file over the earlier export
    assert ".tmp" not in " ".join(os.listdir(place))


def test_a_full_disk_is_one_line_and_keeps_the_earlier_export(place, monkeypatch, capsys):
    from tsld_jax.quant import export

    output = place / "out.bin"
    output.write_bytes(b"earlier export")

    def full_disk(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_packed", full_disk)
    argv = ["--model", str(place / "model"), "--quant", "twn", "--format", "packed"]
    assert export_cli.main([*argv, "--output", str(output), "--overwrite"]) == 1  # the machine
    assert capsys.readouterr().err.strip() == (
        f"error: --output {output}: No space left on device; nothing was written (the earlier "
        "one there is unchanged)"
    )
    assert output.read_bytes() == b"earlier export"
    assert ".tmp" not in " ".join(os.listdir(place))


# export.py with the model loading skipped and a GGUF writer that has written part of its file
# when SIGTERM comes.
_SLOW_EXPORT = textwrap.dedent(
    """
    import sys, time, types
    sys.path.insert(0, {root!r})
    from tsld_jax import export_cli
    from tsld_jax.models import gguf_export

    def slow_writer(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(120)

    fields = dict(params=None, spec=None, hf_config=None, rules=None, name="")
    export_cli.load_source = lambda args: types.SimpleNamespace(**fields)
    export_cli._vocab = lambda source: None
    gguf_export.check_supported = lambda spec: None
    gguf_export.write_gguf = slow_writer
    sys.exit(export_cli.main({argv!r}))
    """
)


def test_sigterm_midway_keeps_the_earlier_export(place):
    output = place / "out.gguf"
    output.write_bytes(b"earlier export " * 1000)
    before = _snapshot(place)
    argv = ["--model", str(place / "model"), "--format", "gguf-f16", "--output", str(output)]
    code = _SLOW_EXPORT.format(root=ROOT, argv=[*argv, "--overwrite"])
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert process.stdout.readline().strip() == "writing", process.stderr.read()[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143  # before: killed (-15) with a partial file
        error = process.stderr.read().strip().splitlines()
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    assert error == [
        f"error: stopped by SIGTERM; {output} was not written (the earlier one there is unchanged)"
    ]
    assert _snapshot(place) == before
    assert ".tmp" not in " ".join(os.listdir(place))

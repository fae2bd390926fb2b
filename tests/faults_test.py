"""Fault injection: a full disk, a read-only place, signals and kills while train.py, eval.py
and export.py write. Each case asserts one `error:` line (or none), the exit code, and that
every file that was there before is byte-identical afterwards (docs/errors.md lists them).

The full disks are real: a tmpfs of a few hundred KiB mounted for the test, then filled. That
needs root (CI and this project's machines run as root); elsewhere those cases are skipped,
saying so.
"""

import errno
import json
import os
import signal
import subprocess
import time

import jax
import ml_collections
import numpy as np
import pytest
import tiny_models
import train_test
from errors_test import _snapshot

from tsld_jax import checkpoint, generated_data, trainer
from tsld_jax.models import decoder


@pytest.fixture
def small_disk(tmp_path):
    """`make(size)` mounts a tmpfs of `size` (e.g. "512k") in a new folder and returns it;
    `fill(folder)` then takes all the space left on it. Unmounted after the test."""
    mounted = []

    def make(size="512k"):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0:
            pytest.skip("a full disk needs a tmpfs, and mounting one needs root")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder):
    """Writes `folder/filler` until the file system holding `folder` has no space left."""
    chunk = b"\0" * 4096
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


# --- the run's own files, written whole (issue 27, item 1) --------------------------------------


def _teacher():
    spec = tiny_models.llama_spec()
    return decoder.init_params(jax.random.key(0), spec, std=0.2), spec


def test_generated_data_on_a_full_disk_keeps_the_earlier_samples(small_disk, monkeypatch):
    disk = small_disk()
    earlier = disk / "generated_train.npz"
    np.savez(earlier, tokens=np.zeros((2, 8), np.int32), key="made by other settings")
    before = _snapshot(disk)
    fill(disk)
    monkeypatch.setattr(
        generated_data, "sample", lambda *a, **k: np.ones((4096, 64), np.int32)
    )  # 1 MiB: more than the disk
    cfg = ml_collections.ConfigDict(
        dict(generated_sequences=4096, eval_blocks=1, block_size=64, generated_temperature=1.0)
    )
    with pytest.raises(OSError) as raised:
        generated_data.load_or_sample(cfg, None, _teacher(), str(disk), "train")
    assert raised.value.errno == errno.ENOSPC
    after = _snapshot(disk)
    after.pop("filler")
    # Before: a `generated_train.npz.tmp.PID.npz` was left beside it, holding the disk's space.
    assert after == before


def test_fp_export_on_a_full_disk_keeps_the_earlier_export(small_disk, tmp_path):
    from tsld_jax.models import load_model

    model = tmp_path / "model"
    tiny_models.save_numpy("gpt2", str(model))
    student = load_model(str(model), load_tokenizer=False)
    workdir = small_disk("1m")
    assert trainer.write_fp_export(str(workdir), student.params, student) == str(workdir / "export")
    (workdir / "export" / "notes.txt").write_text("an earlier export, with a file of its own")
    before = _snapshot(workdir)
    fill(workdir)
    with pytest.raises(OSError) as raised:
        trainer.write_fp_export(str(workdir), student.params, student)
    assert raised.value.errno == errno.ENOSPC
    after = _snapshot(workdir)
    after.pop("filler")
    # Before: save_hf wrote into export/ in place: its config.json replaced, a cut-short
    # model.safetensors beside it.
    assert after == before
    os.remove(workdir / "filler")
    trainer.write_fp_export(str(workdir), student.params, student)
    # Swapped whole: nothing of the earlier export (its notes.txt) remains.
    assert sorted(os.listdir(workdir)) == ["export"]
    assert sorted(os.listdir(workdir / "export")) == ["config.json", "model.safetensors"]


def test_curves_on_a_full_disk_keep_the_earlier_png(small_disk):
    from tsld_jax import run_summary

    workdir = small_disk()
    records = [{"step": s, "loss": 5.0 - s, "gt": 5.0 - s} for s in range(1, 4)]
    (workdir / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in records))
    (workdir / "curves.png").write_bytes(b"\x89PNG an earlier plot")
    before = _snapshot(workdir)
    fill(workdir)
    with pytest.raises(OSError) as raised:
        run_summary.plot_curves(str(workdir))
    assert raised.value.errno == errno.ENOSPC
    after = _snapshot(workdir)
    after.pop("filler")
    assert after == before  # before: curves.png cut short (savefig writes in place)


# --- train.py on a full disk (item 3) ----------------------------------------------------------


def _error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_train_on_a_disk_too_small_for_a_checkpoint_refuses_before_training(
    small_disk, shared_data
):
    # A smoke checkpoint is about 0.4 MiB; a file can still be created (the old probe passed).
    workdir = small_disk("200k") / "run"
    result = train_test._train(workdir, shared_data)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert line.startswith(f"error: --workdir {workdir} is full: {workdir}/checkpoints has 0.")
    assert line.endswith("no checkpoint was saved yet; free some space or pass another --workdir")
    assert os.listdir(workdir / "checkpoints") == [] and not (workdir / "metrics.jsonl").exists()


def test_train_filling_the_disk_mid_run_is_one_line_naming_the_kept_checkpoint(
    small_disk, shared_data
):
    # Room for the first checkpoint (step 2) and the logs, not for the second: orbax's threads
    # fail midway. Before: 175 lines of orbax tracebacks and no error line.
    workdir = small_disk("720k") / "run"
    result = train_test._train(workdir, shared_data)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert line.startswith(f"error: --workdir {workdir} is full")
    assert f"the last checkpoint kept is step 2 ({workdir}/checkpoints/2)" in line
    assert "ERROR:absl" not in result.stderr and len(result.stderr.splitlines()) < 5
    assert checkpoint.saved_steps(str(workdir)) == [2]
    _, step = train_test._final_params(workdir)  # what it names restores
    assert step == 2


# --- signals at any moment of train.py's start-up (item 5) -------------------------------------


@pytest.mark.parametrize(
    "sig, delay",
    [
        (signal.SIGINT, 0.3),  # importing jax: before, a traceback
        (signal.SIGINT, 1.5),
        (signal.SIGINT, 3.0),  # loading, compiling: before, "interrupted" then a segfault (139)
        (signal.SIGTERM, 2.0),
    ],
)
def test_signal_during_start_up_is_one_line(sig, delay, tmp_path, shared_data):
    (tmp_path / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    process = subprocess.Popen(
        train_test._command(tmp_path, shared_data, "--config.train.steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=train_test.ROOT,
        env=train_test._env(),
    )
    time.sleep(delay)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    name = signal.Signals(sig).name
    lines = [line for line in err.splitlines() if line.startswith(f"stopped by {name}")]
    assert len(lines) == 1, err[-3000:]
    assert _snapshot(tmp_path)["notes.txt"] == before["notes.txt"]

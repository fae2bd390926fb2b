"""Checkpoints: resume means the same run (config comparison), only the training run sets a
corrupt checkpoint aside, and readers (eval.py --checkpoint) never write into the run they read:
they work on a read-only copy, fall back past a corrupt newest checkpoint, and past one that a
live run deletes under them."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from tsld_jax import checkpoint, recipe, train_step, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config():
    sys.path.insert(0, ROOT)
    try:
        from configs import smoke

        return smoke.get_config()
    finally:
        sys.path.remove(ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke run's workdir with checkpoints 2, 4 and 6 (saved here: no training needed)."""
    cfg = _smoke_config()
    directory = tmp_path_factory.mktemp("run")
    (directory / "config.json").write_text(cfg.to_json(indent=2))
    student, _ = recipe.load_models(cfg, teacher=False)
    rules = recipe.quant_rules(cfg)
    params = recipe.initial_student_params(student.params, rules, cfg)
    _, optimizer, _ = recipe.abstract_state(cfg, params, cfg.train.steps)
    state = train_step.init_state(params, optimizer, cfg.seed)
    saver = checkpoint.Checkpointer(str(directory), keep=3)
    for step in (2, 4, 6):
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        saver.save(step, state, {"data": {"epoch": 0, "index": step}, "step": step})
    saver.close()
    return directory


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _corrupt(directory, step):
    for path in glob.glob(
        str(directory / "checkpoints" / str(step) / "state" / "**" / "*"), recursive=True
    ):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")


def _snapshot(directory):
    """Every path under `directory` with its mode, size, mtime and content hash."""
    tree = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            digest = ""
            if os.path.isfile(path):
                digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            tree[os.path.relpath(path, directory)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
                digest,
            )
    return tree


# --- resume means the same run --------------------------------------------------------------


def test_config_changes_split_identity_from_resumable_fields():
    old = _smoke_config()
    new = _smoke_config()
    new.train.steps, new.log.every_steps, new.mesh.data = 40, 5, 1
    new.quant.method, new.data.block_size = "sym", 64
    identity, resumable = checkpoint.config_changes(
        json.loads(old.to_json()), json.loads(new.to_json())
    )
    assert [f for f, _, _ in identity] == ["data.block_size", "quant.method"]
    assert [f for f, _, _ in resumable] == ["log.every_steps", "mesh.data", "train.steps"]
    assert identity[1] == ("quant.method", "twn", "sym")
    # A field the stored config lacks (a newer config schema) is an identity change.
    identity, _ = checkpoint.config_changes({"seed": 0}, {"seed": 0, "extra": {"x": 1}})
    assert identity == [("extra.x", "<absent>", 1)]


def test_check_resume_refuses_another_run_and_logs_allowed_changes(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    cfg = _smoke_config()
    cfg.model.random.hidden_size, cfg.seed = 64, 1
    with pytest.raises(workdir.WorkdirError) as error:
        checkpoint.check_resume(cfg, str(copy))
    message = str(error.value)
    assert "model.random.hidden_size 32 -> 64" in message and "seed 0 -> 1" in message
    assert "new --workdir" in message and "\n" not in message
    assert _snapshot(copy) == _snapshot(run)  # nothing moved, config.json kept
    cfg = _smoke_config()
    cfg.train.steps, cfg.checkpoint.keep = 50, 5
    checkpoint.check_resume(cfg, str(copy))
    out = capsys.readouterr().out
    assert "resuming with changed settings: checkpoint.keep 3 -> 5, train.steps 20 -> 50" in out
    assert json.loads((copy / "config.json").read_text())["train"]["steps"] == 50


def test_check_resume_without_checkpoints_accepts_any_config(tmp_path):
    (tmp_path / "config.json").write_text(_smoke_config().to_json())
    cfg = _smoke_config()
    cfg.loss.kind = "gt"
    checkpoint.check_resume(cfg, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["kind"] == "gt"


# --- only the training run sets a corrupt checkpoint aside ----------------------------------


def _abstract(cfg):
    student, _ = recipe.load_models(cfg, teacher=False)
    rules = recipe.quant_rules(cfg)
    params = recipe.initial_student_params(student.params, rules, cfg)
    return recipe.abstract_state(cfg, params, cfg.train.steps)[0]


def test_training_run_sets_corrupt_newest_aside_and_never_all(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    abstract = _abstract(_smoke_config())
    _corrupt(copy, 6)
    saver = checkpoint.Checkpointer(str(copy))
    state, meta = saver.restore(abstract)
    saver.close()
    assert int(state.step) == 4 and meta["step"] == 4
    err = capsys.readouterr().err
    assert "checkpoint 6 does not restore" in err and "falling back to checkpoint 4" in err
    assert checkpoint.saved_steps(str(copy)) == [2, 4]
    assert [p.name.split("-")[0] for p in (copy / "unreadable_checkpoints").iterdir()] == ["6"]
    # None restores: stop, and leave every checkpoint where it is.
    _corrupt(copy, 4)
    _corrupt(copy, 2)
    before = _snapshot(copy / "checkpoints")
    saver = checkpoint.Checkpointer(str(copy))
    with pytest.raises(workdir.WorkdirError, match="none of the 2 checkpoints .* restores"):
        saver.restore(abstract)
    saver.close()
    assert _snapshot(copy / "checkpoints") == before


# --- readers never write --------------------------------------------------------------------


def test_reader_falls_back_past_corrupt_newest_without_moving_it(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    _corrupt(copy, 6)
    before = _snapshot(copy)
    restored = checkpoint.restore_for_eval(str(copy))
    assert restored["step"] == 4
    err = capsys.readouterr().err
    assert "checkpoint 6 (" in err and "using step 4" in err
    assert _snapshot(copy) == before


def test_reader_survives_a_checkpoint_deleted_between_listing_and_reading(
    run, tmp_path, monkeypatch, capsys
):
    copy = _copy(run, tmp_path)
    listed = checkpoint.saved_steps

    def list_then_delete(directory):
        steps = listed(directory)
        # The live run's keep policy deletes the newest listed step before the reader gets to it.
        shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(directory), str(steps[-1])))
        return steps

    monkeypatch.setattr(checkpoint, "saved_steps", list_then_delete)
    restored = checkpoint.restore_for_eval(str(copy))
    assert restored["step"] == 4
    assert "using step 4" in capsys.readouterr().err


def _read_only_prefix(directory) -> list[str]:
    """A command prefix that runs a command with `directory` mounted read-only.

    Permission bits do not stop root, so as root a read-only bind mount in a private mount
    namespace (`unshare -m`) is the proof; as another user `chmod -R a-w` is.
    """
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(directory)], check=True)
        return []
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without unshare -m: cannot make a read-only mount here")
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        f'mount --bind -o ro "{directory}" "{directory}" && exec "$@"',
        "sh",
    ]


def test_eval_cli_on_a_read_only_run(run, tmp_path, shared_data):
    copy = _copy(run, tmp_path)
    _corrupt(copy, 6)
    before = _snapshot(copy)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            *_read_only_prefix(copy),
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--checkpoint",
            str(copy),
            "--task",
            "ptb",
            "--data-dir",
            str(shared_data),
            "--block-size",
            "32",
            "--max-blocks",
            "1",
            "--output",
            str(tmp_path / "out.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"},
    )
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 6 (" in result.stderr and "using step 4" in result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["model"].endswith("@4")
    assert _snapshot(copy) == before


def test_check_resume_failing_write_keeps_the_stored_config(tmp_path, monkeypatch):
    import errno

    stored = _smoke_config().to_json()
    (tmp_path / "config.json").write_text(stored)

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.check_resume(_smoke_config(), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == stored
    assert os.listdir(tmp_path) == ["config.json"]  # before: config.json.tmp.PID left beside it

"""train.py end to end on the smoke config: resume after SIGKILL is bit-exact, a corrupt
checkpoint falls back, NaN stops the run, SIGTERM checkpoints, profiles are written."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from tsld_jax import checkpoint, run_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax_test_jit")


def _command(workdir, shared_data, *flags):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        str(workdir),
        "--config.data.name=ptb",
        f"--config.data.dir={shared_data}",
        "--config.train.steps=8",
        "--config.checkpoint.every_steps=2",
        "--config.log.progress=False",
        "--config.eval.baselines=False",
        *flags,
    ]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    return {
        **env,
        "HF_HUB_OFFLINE": "1",  # the platform (JAX_PLATFORMS): conftest's
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _train(workdir, shared_data, *flags):
    return subprocess.run(
        _command(workdir, shared_data, *flags),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=600,
    )


def _final_params(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    params, _, _, step = checkpoint.restore_params(config, str(workdir))
    return params, step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = _train(workdir, shared_data)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_run_writes_logs_and_results(uninterrupted):
    workdir, result = uninterrupted
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"loss", "lr", "tokens_per_sec", "tsld", "gt"} <= set(r) for r in steps)
    assert any("eval_ppl" in r for r in records)
    assert glob.glob(str(workdir / "events.out.tfevents.*"))
    assert json.load(open(workdir / "config.json"))["loss"]["kind"] == "tsld"
    assert "qat_ppl" in json.load(open(workdir / "results.json"))
    assert "results:" in result.stdout
    with open(workdir / "curves.png", "rb") as f:  # the run's loss and perplexity curves
        assert f.read(4) == b"\x89PNG"


def test_sigkill_and_corrupt_checkpoint_resume_bit_exact(uninterrupted, tmp_path, shared_data):
    workdir, _ = uninterrupted
    killed = _train(tmp_path, shared_data, "--config.debug.sigkill_after_step=5")
    assert killed.returncode == -signal.SIGKILL
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps[-1] == 4
    # Corrupt the newest checkpoint: the run must warn and fall back to step 2.
    for path in glob.glob(
        str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"), recursive=True
    ):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    resumed = _train(tmp_path, shared_data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint 4 does not restore" in resumed.stderr
    assert "falling back to checkpoint 4" not in resumed.stderr
    assert "falling back to checkpoint 2" in resumed.stderr
    assert "resuming from step 2" in resumed.stdout
    # Only the training run sets a corrupt checkpoint aside (moved, never deleted).
    assert [p.split("-")[0] for p in os.listdir(tmp_path / "unreadable_checkpoints")] == ["4"]
    expected, step = _final_params(workdir)
    got, got_step = _final_params(tmp_path)
    assert step == got_step == 8
    for a, b in zip(
        __import__("jax").tree.leaves(expected), __import__("jax").tree.leaves(got), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_stops_with_step_and_keeps_good_checkpoint(tmp_path, shared_data):
    result = _train(
        tmp_path,
        shared_data,
        "--config.train.lr=1e30",
        "--config.guard.max_lr=1e31",  # absurd on purpose
        "--config.train.grad_clip=0",
        "--config.train.warmup_steps=0",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")][0]
    assert "non-finite loss" in error and "at step" in error
    bad_step = int(error.split("at step ")[1].split(";")[0])
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert all(s < bad_step for s in saved)
    # The message says what was kept, or that nothing was (before: "the last good checkpoint is
    # kept in .../checkpoints" with none there).
    if saved:
        assert f"the last good checkpoint is step {max(saved)} in {tmp_path}/checkpoints" in error
    else:
        assert f"no checkpoint was saved ({tmp_path}/checkpoints holds none)" in error


def test_nan_after_a_checkpoint_names_it(tmp_path, shared_data):
    result = _train(
        tmp_path,
        shared_data,
        "--config.train.lr=1e30",
        "--config.guard.max_lr=1e31",
        "--config.train.grad_clip=0",
        "--config.train.warmup_steps=0",
        "--config.checkpoint.every_steps=1",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")][0]
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and f"the last good checkpoint is step {saved[-1]} in " in error, error


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signal(sig, tmp_path, shared_data):
    process = subprocess.Popen(
        _command(
            tmp_path,
            shared_data,
            "--config.train.steps=100000",
            "--config.checkpoint.every_steps=100000",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.5)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    # The shell's convention (143, 130), so that `train.py && eval.py` stops here.
    assert process.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name} at step" in err and "Traceback" not in err
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert steps and max(steps) >= 3
    assert not (tmp_path / "results.json").exists()


def test_divergence_stops_with_the_step_and_keeps_the_checkpoint_before_it(tmp_path, shared_data):
    # lr=1e3 (allowed on purpose) after one warm-up step at lr 0: the cross-entropy jumps from
    # 6.3 to millions at step 3 and stays there; the guard stops the run after 4 such steps.
    result = _train(
        tmp_path,
        shared_data,
        "--config.train.steps=30",
        "--config.checkpoint.every_steps=1",
        "--config.train.lr=1e3",
        "--config.guard.max_lr=1e4",
        "--config.train.warmup_steps=2",
        "--config.guard.patience=4",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "training diverged at step 6" in error[0], result.stderr[-3000:]
    assert "since step 3" in error[0] and "the last checkpoint from before it is step 1" in error[0]
    # Step 2's checkpoint was saved before anything showed; none was saved during the streak.
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps == [1, 2]
    assert not (tmp_path / "results.json").exists()


def test_profile_trace_is_written(tmp_path, shared_data):
    result = _train(tmp_path, shared_data, "--config.profile.steps=2,3", "--config.train.steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_fp_then_qat_recipe(tmp_path, shared_data):
    import tiny_models

    model_dir = tmp_path / "model"
    tiny_models.save("llama_tied", str(model_dir))
    words = (shared_data / "ptb" / "ptb.train.txt").read_text().split()[:2000]
    tiny_models.save_word_tokenizer(str(model_dir), sorted(set(words))[: tiny_models.VOCAB - 1])
    fp = _train(
        tmp_path / "fp",
        shared_data,
        "--config.stage=fp",
        "--config.loss.kind=gt",
        "--config.quant.method=none",
        f"--config.model.name_or_path={model_dir}",
        "--config.train.steps=4",
    )
    assert fp.returncode == 0, fp.stderr[-3000:]
    export = tmp_path / "fp" / "export"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    qat = _train(
        tmp_path / "qat",
        shared_data,
        f"--config.model.name_or_path={export}",
        "--config.train.steps=4",
        "--config.eval.baselines=True",
    )
    assert qat.returncode == 0, qat.stderr[-3000:]
    results = json.load(open(tmp_path / "qat" / "results.json"))
    assert {"teacher_ppl", "ptq_ppl", "qat_ppl"} <= set(results)
    summary = run_summary.closing_lines(results, None, results["step"] * 4 * 32)
    assert summary and summary[0] in qat.stdout  # what the run showed, in its own words
    shutil.rmtree(tmp_path / "qat")

"""Bad input to train.py and eval.py: one `error: ...` line on stderr, exit 2, no traceback,
and nothing on disk lost (docs/errors.md lists the cases)."""

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_models

from tsld_jax.evaluation import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def old_run(tmp_path):
    """A workdir holding another run's checkpoint and results, which no error may touch."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "checkpoints" / "4" / "state").write_bytes(b"weights")
    (workdir / "results.json").write_text('{"qat_ppl": 12.5}')
    (workdir / "config.json").write_text("{}")
    return workdir


def _one_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "the config file does not exist"),
        ("directory", "the config file is a directory"),
        ("syntax", "syntax error at line 1"),
        ("no_get_config", "the file defines no get_config()"),
        ("raises", "ValueError: boom"),
        ("returns_int", "get_config() returned int, not a ConfigDict"),
        ("bad_arg", "TypeError: get_config() takes 0 positional arguments"),
        ("unknown_field", "--config.train.no_such=1: the config has no field 'no_such'"),
        ("unknown_section", "--config.nosuch.x=1: the config has no field 'nosuch'"),
        ("wrong_type", "--config.train.steps=2.5: invalid literal for int()"),
    ],
)
def test_bad_config_file(case, expected, tmp_path, old_run, capsys):
    config, flags = SMOKE, []
    if case == "missing":
        config = str(tmp_path / "nope.py")
    elif case == "directory":
        config = str(tmp_path)
    elif case == "syntax":
        config = _write(tmp_path, "c.py", "def get_config(:\n")
    elif case == "no_get_config":
        config = _write(tmp_path, "c.py", "x = 1\n")
    elif case == "raises":
        config = _write(tmp_path, "c.py", "def get_config():\n    raise ValueError('boom')\n")
    elif case == "returns_int":
        config = _write(tmp_path, "c.py", "def get_config():\n    return 5\n")
    elif case == "bad_arg":
        config = SMOKE + ":small"
    elif case == "unknown_field":
        flags = ["--config.train.no_such=1"]
    elif case == "unknown_section":
        flags = ["--config.nosuch.x=1"]
    elif case == "wrong_type":
        flags = ["--config.train.steps=2.5"]
    before = _snapshot(old_run)
    assert train.main(["train.py", "--config", config, "--workdir", str(old_run), *flags]) == 2
    assert expected in _one_error(capsys)
    assert _snapshot(old_run) == before


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--config.train.lr=inf", "config.train.lr: must be a finite number, got inf"),
        ("--config.train.lr=nan", "config.train.lr: must be a finite number, got nan"),
        ("--config.train.lr=1e6", "above guard.max_lr=1.0"),
        ("--config.loss.temperature=-1", "config.loss.temperature: must be > 0"),
        ("--config.loss.temperature=nan", "config.loss.temperature: must be a finite number"),
        ("--config.train.warmup_steps=100", "config.train.warmup_steps: 100 is more than"),
        ("--config.train.grad_clip=nan", "config.train.grad_clip: must be a finite number"),
        ("--config.train.b1=1", "config.train.b1: must be in [0, 1)"),
        ("--config.train.b2=-0.1", "config.train.b2: must be in [0, 1)"),
        ("--config.train.eps=0", "config.train.eps: must be > 0"),
        ("--config.train.weight_decay=inf", "config.train.weight_decay: must be a finite"),
        ("--config.data.generated_temperature=-1", "config.data.generated_temperature"),
        ("--config.model.random.num_heads=5", "config.model.random.num_heads: must divide"),
        ("--config.guard.action=ignore", "config.guard.action"),
        # Eight fake CPU devices in the tests (conftest.py).
        ("--config.mesh.tensor=3", "config.mesh: data x fsdp x tensor = 3 does not divide"),
        ("--config.mesh.data=-1 --config.mesh.fsdp=-1", "only one axis may be -1"),
        ("--config.data.batch_size=4", "config.data.batch_size: 4 (per micro-batch 4) must"),
    ],
)
def test_bad_hyper_parameter_or_mesh(flag, expected, old_run, capsys):
    before = _snapshot(old_run)
    argv = ["train.py", "--config", SMOKE, "--workdir", str(old_run), *flag.split()]
    assert train.main(argv) == 2
    assert expected in _one_error(capsys)
    # Stopped before the teacher was sampled or anything was written.
    assert _snapshot(old_run) == before


def build_tiny_dir(directory, shared_data) -> str:
    """A GPT-2 with 64 learned positions and a 97-word tokenizer, saved in `directory`."""
    tiny_models.build("gpt2", str(directory))
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text().split()[:20000]
    words = [w for w, _ in collections.Counter(text).most_common(tiny_models.VOCAB - 1)]
    tiny_models.save_word_tokenizer(str(directory), words)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, shared_data):
    """A GPT-2 with 64 learned positions and a 97-word tokenizer."""
    return build_tiny_dir(tmp_path_factory.mktemp("gpt2_errors"), shared_data)


def test_train_block_size_beyond_learned_positions(tiny_dir, shared_data, tmp_path, capsys):
    argv = [
        "train.py",
        "--config",
        SMOKE,
        "--workdir",
        str(tmp_path),
        f"--config.model.name_or_path={tiny_dir}",
        "--config.data.name=ptb",
        f"--config.data.dir={shared_data}",
        "--config.data.block_size=128",
        "--config.data.batch_size=8",
    ]
    assert train.main(argv) == 2
    error = _one_error(capsys)
    assert "config.data.block_size: 128 is longer than the 64 positions of" in error
    assert not (tmp_path / "checkpoints").exists()


def _eval_args(tiny_dir, shared_data, *extra):
    return [
        "--model",
        tiny_dir,
        "--task",
        "ptb",
        "--data-dir",
        str(shared_data),
        "--block-size",
        "16",
        "--max-blocks",
        "1",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--block-size", "128"], "--block-size 128 is longer than the model's 64 positions"),
        (["--max-length", "100"], "--max-length 100 is longer than the model's 64 positions"),
    ],
)
def test_eval_length_beyond_learned_positions(extra, expected, tiny_dir, shared_data, capsys):
    assert cli.main(_eval_args(tiny_dir, shared_data, *extra)) == 2
    assert expected in _one_error(capsys)


def test_eval_output_in_a_missing_folder_is_created(tiny_dir, shared_data, tmp_path):
    out = tmp_path / "new" / "deeper" / "ppl.json"
    assert cli.main(_eval_args(tiny_dir, shared_data, "--output", str(out))) == 0
    assert json.loads(out.read_text())["blocks"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["ppl.json"]  # no temporary left behind


@pytest.mark.parametrize("case", ["directory", "under_a_file"])
def test_eval_output_that_cannot_be_written_is_refused_first(
    case, tiny_dir, shared_data, tmp_path, capsys, monkeypatch
):
    loaded = []
    monkeypatch.setattr(cli, "load_eval_model", lambda args: loaded.append(args))
    (tmp_path / "file").write_text("keep")
    out = tmp_path if case == "directory" else tmp_path / "file" / "ppl.json"
    assert cli.main(_eval_args(tiny_dir, shared_data, "--output", str(out))) == 2
    error = _one_error(capsys)
    assert error.startswith(f"error: --output {out}") and not loaded
    assert (tmp_path / "file").read_text() == "keep"


def test_packed_model_with_another_tokenizer(tiny_dir, shared_data, tmp_path, capsys):
    from tsld_jax import quant
    from tsld_jax.models import load_model
    from tsld_jax.quant import export

    loaded = load_model(tiny_dir, load_tokenizer=False)
    path = str(tmp_path / "packed.safetensors")
    export.save_packed(
        path, export.export_packed(loaded.params, quant.preset_rules("twn")), loaded.spec
    )
    other = tmp_path / "other_tokenizer"
    words = (shared_data / "ptb" / "ptb.valid.txt").read_text().split()
    tiny_models.save_word_tokenizer(str(other), sorted(set(words))[:500])
    args = _eval_args(tiny_dir, shared_data)[2:]
    assert cli.main(["--packed", path, "--tokenizer", str(other), *args]) == 2
    error = _one_error(capsys)
    assert f"--tokenizer {other} has 500 tokens" in error and "vocabulary of 97" in error


def test_packed_file_refuses_another_tokenizer_of_its_size(tiny_dir, shared_data, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tsld_jax import export_cli
    from tsld_jax.quant import export

    path = str(tmp_path / "packed.safetensors")
    argv = ["--model", tiny_dir, "--quant", "twn", "--format", "packed", "--output", path]
    assert export_cli.main(argv) == 0
    vocab = AutoTokenizer.from_pretrained(tiny_dir).get_vocab()
    assert export.packed_tokenizer(path).vocab_size == len(vocab) == 96
    # The same words with their ids reversed: the size check alone lets it through.
    words = sorted((word for word in vocab if word != "<unk>"), key=vocab.get, reverse=True)
    other = tmp_path / "shuffled_tokenizer"
    tiny_models.save_word_tokenizer(str(other), words)
    args = _eval_args(tiny_dir, shared_data)[2:]
    capsys.readouterr()
    assert cli.main(["--packed", path, "--tokenizer", str(other), *args]) == 2  # before: 0
    error = _one_error(capsys)
    assert f"--tokenizer {other} (96 tokens, vocabulary sha256 " in error
    assert f"is not the tokenizer --packed {path} was exported with (96 tokens, " in error
    assert cli.main(["--packed", path, "--tokenizer", tiny_dir, *args]) == 0


@pytest.mark.parametrize("damage", ["random_bytes", "cut_short"])
def test_unreadable_packed_file(damage, tiny_dir, shared_data, tmp_path, capsys):
    from tsld_jax import quant
    from tsld_jax.models import load_model
    from tsld_jax.quant import export

    path = tmp_path / "packed.safetensors"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        loaded = load_model(tiny_dir, load_tokenizer=False)
        packed = export.export_packed(loaded.params, quant.preset_rules("twn"))
        export.save_packed(str(path), packed, loaded.spec)
        path.write_bytes(path.read_bytes()[:-1000])
    args = _eval_args(tiny_dir, shared_data)[2:]
    assert cli.main(["--packed", str(path), "--tokenizer", tiny_dir, *args]) == 2
    assert f"--packed {path}: {path}: unreadable " in _one_error(capsys)  # before: a traceback


def test_checkpoint_with_a_wrongly_shaped_tensor(tiny_dir, shared_data, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "transformer.h.1.mlp.c_fc.weight"
    tensors[name] = np.zeros((32, 100), np.float32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(_eval_args(str(bad), shared_data)) == 2
    error = _one_error(capsys)
    assert f"tensor {name!r} has shape (32, 100)" in error and "implies (32, 128)" in error


@pytest.mark.parametrize(
    "case, expected",
    [
        ("checkpoint_on_a_model_folder", "its config.json is not a train.py config"),
        ("tokenizer_folder_without_one", "cannot load a tokenizer"),
        ("corrupt_safetensors", "unreadable safetensors file"),
        ("truncated_gguf", "unreadable GGUF file"),
        ("weights_missing", "no *.safetensors or pytorch_model*.bin weight file"),
    ],
)
def test_more_bad_eval_inputs(case, expected, tiny_dir, shared_data, tmp_path, capsys):
    args = _eval_args(tiny_dir, shared_data)[2:]
    if case == "checkpoint_on_a_model_folder":
        source = ["--checkpoint", tiny_dir]
    elif case == "tokenizer_folder_without_one":
        from tsld_jax.models import load_model
        from tsld_jax.quant import export

        loaded = load_model(tiny_dir, load_tokenizer=False)
        path = str(tmp_path / "packed.safetensors")
        export.save_packed(path, loaded.params, loaded.spec)
        source = ["--packed", path, "--tokenizer", str(tmp_path)]
    elif case == "truncated_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
        source = ["--model", str(tmp_path / "m.gguf")]
    else:
        model = tmp_path / "model"
        shutil.copytree(tiny_dir, model)
        if case == "corrupt_safetensors":
            (model / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"garbage")
        else:
            (model / "model.safetensors").unlink()
        source = ["--model", str(model)]
    assert cli.main([*source, *args]) == 2
    assert expected in _one_error(capsys)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--config.data.name=text", "--config.data.path={tmp}"], "is a directory, not a file"),
        (["--config.model.name_or_path=gpt2"], "not a local path and HF_HUB_OFFLINE is set"),
        (["--config.checkpoint.keep=0"], "config.checkpoint.keep"),
        (["--config.profile.steps=3"], "config.profile.steps"),
    ],
)
def test_more_bad_train_inputs(flags, expected, tmp_path, old_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(old_run)
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert train.main(["train.py", "--config", SMOKE, "--workdir", str(old_run), *flags]) == 2
    assert expected in _one_error(capsys)
    assert _snapshot(old_run) == before


@pytest.mark.parametrize("progress", [False, True])
def test_teacher_sampling_bar_obeys_log_progress(progress, tmp_path, capsys):
    import jax

    from configs import smoke
    from tsld_jax import data
    from tsld_jax.models import decoder, named

    cfg = smoke.get_config()
    cfg.data.block_size, cfg.data.generated_sequences = 8, 4
    spec = named.random_spec(cfg.model.random)
    params = decoder.init_params(jax.random.key(0), spec, std=0.2)
    examples = data.load_examples(
        cfg.data, named.ByteTokenizer(), "train", (params, spec), str(tmp_path), progress=progress
    )
    assert examples["tokens"].shape == (4, 8)
    assert ("sampling teacher data" in capsys.readouterr().err) == progress


@pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins") is None  # (the parent first: find_spec imports it)
    or importlib.util.find_spec("jax_plugins.xla_cuda12") is None
    or os.path.exists("/proc/driver/nvidia"),
    reason="needs the CUDA plugin installed on a machine without an NVIDIA driver",
)
def test_cuda_plugin_without_a_gpu_prints_no_traceback():
    # `make test` installs jax's CUDA plugin for deviceless compiles; a user's `python train.py`
    # in that venv, without the Makefile's environment, must start on the CPU quietly.
    env = dict(os.environ)
    env.pop("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", None)
    env.pop("JAX_PLATFORMS", None)
    code = "import tsld_jax, jax; print(jax.devices()[0].platform)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# --- the plan flags and --help (issue 27) --------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if train.py goes on to train or to plan."""
    from tsld_jax import plan, trainer

    def refuse(*args, **kwargs):
        raise AssertionError("train.py went on to train or plan")

    monkeypatch.setattr(trainer, "train_and_evaluate", refuse)
    monkeypatch.setattr(plan, "plan", refuse)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--plan", ""], "--plan needs a target"),
        (["--plan="], "--plan needs a target"),
        (["--plan-json", "{tmp}/plan.json"], "--plan-json applies to --plan"),
        (["--plan", "cpu:1", "--plan-json", "{tmp}"], "is a directory; name a file"),
        (["--plan", "cpu:1", "--plan-json", "{tmp}/no/plan.json"], "/no does not exist"),
    ],
)
def test_plan_flag_mistakes_are_one_line(flags, expected, tmp_path, old_run, capsys, no_training):
    # Before: `--plan ''` trained into the workdir and `--plan-json` alone was ignored (exit 0);
    # a --plan-json folder was a traceback after the whole compile.
    before = _snapshot(old_run)
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert train.main(["train.py", "--config", SMOKE, "--workdir", str(old_run), *flags]) == 2
    assert expected in _one_error(capsys)
    assert _snapshot(old_run) == before


def test_plan_json_failing_midway_keeps_the_earlier_file(tmp_path, monkeypatch):
    from configs import smoke
    from tsld_jax import plan

    path = tmp_path / "plan.json"
    path.write_text('{"plan": "earlier"}')
    # json.dump writes the first fields, then meets a value it cannot write.
    monkeypatch.setattr(plan, "plan", lambda config, target: {"plan": {"a": 1}, "z": object()})
    monkeypatch.setattr(plan, "format_plan", lambda out: "plan")
    with pytest.raises(TypeError):
        train._plan(smoke.get_config(), "h100-80gb:1", str(path))
    assert path.read_text() == '{"plan": "earlier"}'  # before: '{\n  "plan": {\n    "a": 1...'
    assert os.listdir(tmp_path) == ["plan.json"]


def test_run_whose_config_json_is_cut_short(tiny_dir, shared_data, old_run, capsys):
    from configs import smoke

    (old_run / "config.json").write_text(smoke.get_config().to_json(indent=2)[:200])
    before = _snapshot(old_run)
    config = old_run / "config.json"
    # Before: a JSONDecodeError traceback (train.py), a message without the file (eval.py).
    argv = ["train.py", "--config", SMOKE, "--config.data.batch_size=8", "--workdir", str(old_run)]
    assert train.main(argv) == 2
    assert f"{config} is unreadable (" in _one_error(capsys)
    args = _eval_args(tiny_dir, shared_data)[2:]
    assert cli.main(["--checkpoint", str(old_run), *args]) == 2
    assert f"{config} is unreadable (" in _one_error(capsys)
    after = _snapshot(old_run)
    after.pop("train.lock")  # the run's lock, released (empty), as after any run
    assert after == before


def test_plan_for_a_gpu_without_the_cuda_plugin(tmp_path, old_run, monkeypatch, capsys):
    from jax.experimental import topologies

    from tsld_jax import aot

    def no_plugin(**_):
        raise RuntimeError("Unknown backend cuda\nsecond line of the backend's complaint")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    aot._devices.cache_clear()
    before = _snapshot(old_run)
    argv = ["train.py", "--config", SMOKE, "--workdir", str(old_run), "--plan", "h200:1"]
    try:
        assert train.main(argv) == 1  # before: the same hint inside a RuntimeError traceback
    finally:
        aot._devices.cache_clear()
    error = _one_error(capsys)
    assert error.startswith("error: --plan h200:1: compiling for a GPU without one needs the CUDA")
    assert error.endswith("before jax starts: Unknown backend cuda")
    assert _snapshot(old_run) == before


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_train_help_lists_the_flags(flag, capsys, no_training):
    # Before: "error: Unknown command line flag 'help'", exit 2.
    assert train.main(["train.py", flag]) == 0
    out = capsys.readouterr().out
    for name in ("--config:", "--workdir:", "--plan:", "--plan-json:", "--config.FIELD=VALUE"):
        assert name in out, out


# --- eval.py --output: written whole, readable like any file (issue 27) -------------------------


def test_eval_output_is_replaced_whole_and_readable(tmp_path):
    path = tmp_path / "ppl.json"
    path.write_text('{"ppl": 12.5}')
    with pytest.raises(TypeError):
        cli.write_output(str(path), {"ppl": 11.0, "model": object()})
    assert path.read_text() == '{"ppl": 12.5}'
    assert os.listdir(tmp_path) == ["ppl.json"]  # before: a .eval-output-* temporary was left
    old = os.umask(0o022)
    try:
        cli.write_output(str(path), {"ppl": 11.0})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"ppl": 11.0}
    assert os.stat(path).st_mode & 0o777 == 0o644  # before: 0600, mkstemp's


# --- --multihost misconfigured (issue 27) --------------------------------------------------------


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        ([], {}, "--multihost: coordinator_address should be defined. Pass --coordinator_address"),
        (
            ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=5"],
            {},
            "--multihost: the process id 5 is not in 0 .. 1 (2 processes)",
        ),
        (
            [],
            {"JAX_NUM_PROCESSES": "two"},
            "--multihost: JAX_NUM_PROCESSES='two' is not an integer",
        ),
    ],
    ids=["no_coordinator", "process_id_out_of_range", "count_not_a_number"],
)
def test_multihost_misconfigured_is_one_line(flags, env, expected, tmp_path):
    # A process of its own: jax.distributed must be joined before jax starts. Before: a
    # ValueError traceback.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI"))}
    environment.update(env, HF_HUB_OFFLINE="1")
    workdir = tmp_path / "run"
    argv = ["train.py", "--config", SMOKE, "--workdir", str(workdir), "--multihost", *flags]
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=environment
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not workdir.exists()


def test_run_with_checkpoints_but_no_config_json_is_refused_first(old_run, capsys):
    # Before: the teacher data was sampled afresh over the run's generated_train.npz and this
    # config stored as the run's config.json, after which the run's real config was refused.
    (old_run / "config.json").unlink()
    (old_run / "generated_train.npz").write_bytes(b"the run's teacher samples")
    before = _snapshot(old_run)
    argv = ["train.py", "--config", SMOKE, "--workdir", str(old_run)]
    assert train.main([*argv, "--config.data.block_size=16", "--config.data.batch_size=8"]) == 2
    error = _one_error(capsys)
    assert f"--workdir {old_run} holds checkpoints (steps 4) but no config.json" in error
    after = _snapshot(old_run)
    after.pop("train.lock")  # the run's lock, released (empty), as after any run
    assert after == before


def test_model_folder_without_tokenizer_files(tiny_dir, shared_data, tmp_path, capsys):
    from tsld_jax import export_cli

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_dir, name), model / name)
    expected = f"{model}: the model has no tokenizer (none of tokenizer.json, "
    # Before: "0 tokens is less than one block" (eval.py, train.py), from a one-token tokenizer
    # that transformers builds out of nothing.
    assert cli.main(_eval_args(str(model), shared_data)) == 2
    assert expected in _one_error(capsys)
    argv = ["train.py", "--config", SMOKE, "--workdir", str(tmp_path / "run")]
    flags = [f"--config.model.name_or_path={model}", "--config.data.name=ptb"]
    flags += [f"--config.data.dir={shared_data}", "--config.data.batch_size=8"]
    assert train.main([*argv, *flags]) == 2
    assert expected in _one_error(capsys)
    # The weights still export; the hf directory gets no invented tokenizer (before: a
    # one-token tokenizer.json, vocab.json, merges.txt ...).
    out = tmp_path / "out"
    assert export_cli.main(["--model", str(model), "--format", "hf", "--output", str(out)]) == 0
    assert "no tokenizer files: the source model has none" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

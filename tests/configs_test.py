"""Every config file loads and validates; a bad config stops with a one-line error naming it."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from tsld_jax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    f
    for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(f) not in ("__init__.py", "paper.py")  # paper.py: the table, no config
)


def load_config(path):
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location("config_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    finally:
        sys.path.remove(ROOT)


def test_every_table_row_has_fp_and_tsld_configs():
    names = {os.path.basename(f)[:-3] for f in CONFIG_FILES}
    for model in (
        "gpt2_0.1b",
        "gpt2_0.3b",
        "gpt2_0.6b",
        "gpt2_1.5b",
        "opt0.1b",
        "opt1.3b",
        "opt2.7b",
        "opt6.7b",
        "gpt_neo1.3b",
        "llama7b",
        "smollm2_135m",
    ):
        assert {f"{model}_fp", f"{model}_tsld"} <= names
    assert "smoke" in names and "base" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_validates(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hub ids are fine here; nothing is fetched
    config = load_config(path)
    config_utils.validate(config)
    assert config.loss.kind in config_utils.LOSS_KINDS


def test_paper_learning_rates():
    assert load_config(os.path.join(ROOT, "configs", "opt2.7b_tsld.py")).train.lr == 5e-5
    llama = load_config(os.path.join(ROOT, "configs", "llama7b_tsld.py"))
    assert (llama.train.lr, llama.train.epochs) == (7e-5, 5)


def _train(*flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    env = {**env, "HF_HUB_OFFLINE": "1"}  # the platform: conftest's
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "flag, field",
    [
        ("--config.train.no_such_field=1", "no_such_field"),
        ("--config.train.lr=abc", "lr"),
        ("--config.train.lr=0", "train.lr"),
        ("--config.quant.granularity=group", "quant.group_size"),
        ("--config.model.name_or_path=/no/such/model", "model.name_or_path"),
        ("--config.loss.kind=mse", "loss.kind"),
        ("--config.train.remat=some", "train.remat"),
    ],
)
def test_bad_config_is_one_line_error(flag, field, tmp_path):
    result = _train(
        "--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir", str(tmp_path), flag
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and field in errors[0], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")  # stopped before anything ran


def test_group_size_not_dividing_names_the_parameter(tmp_path):
    result = _train(
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        str(tmp_path),
        "--config.quant.granularity=group",
        "--config.quant.group_size=5",
        "--config.data.name=text",
        f"--config.data.path={__file__}",
    )
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")][0]
    assert "config.quant" in error and "group_size=5" in error and "layers/" in error


@pytest.mark.parametrize("target, devices", [("8xa100", 8), ("1xh100", 1), ("", 1), ("", 4)])
def test_paper_targets_keep_the_recipe_and_split_the_batch(target, devices, monkeypatch):
    # docs/scaling.md: each row's target variant (CONFIG.py:8xa100) keeps the paper's batch
    # 4 x 512 and learning rates; its mesh takes that many devices and splits the batch.
    sys.path.insert(0, ROOT)
    try:
        from configs import paper
    finally:
        sys.path.remove(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for model, (_, fp_lr, _, qat_lr, _) in paper.TABLE.items():
        for stage, lr in (("fp", fp_lr), ("tsld", qat_lr)):
            path = os.path.join(ROOT, "configs", f"{model}_{stage}.py")
            sys.path.insert(0, ROOT)
            try:
                spec = importlib.util.spec_from_file_location("config_under_test", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                config = module.get_config(target)
            finally:
                sys.path.remove(ROOT)
            assert (config.data.batch_size, config.data.block_size, config.train.lr) == (
                4,
                512,
                lr,
            )
            config_utils.validate(config)
            config_utils.validate_mesh(config, devices)

"""Every config file loads and validates; a bad config stops with a one-line error naming it."""

import glob
import importlib.util
import math
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
        "llama3.2_1b",
        "qwen3_0.6b",
        "qwen2.5_1.5b",
        "gemma3_270m",
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


# Today's rows (configs/paper.HF_CONFIGS): the feature each family's config.json must switch on,
# and the published parameter count (embedding included, tied head counted once).
_LOCAL_GLOBAL = ("local",) * 5 + ("global",)
TODAYS_ROWS = {
    "llama3.2_1b": (
        dict(rope_type="llama3", rope_factor=32.0, rope_original_positions=8192, num_kv_heads=8,
             head_dim=64, tie_embeddings=True, attn_bias=False, qk_norm=False),
        1.24e9,
    ),
    "qwen3_0.6b": (
        dict(qk_norm=True, head_dim=128, num_kv_heads=8, attn_bias=False, rope_type="default",
             rope_theta=1e6, tie_embeddings=True, attention_layers=()),
        0.596e9,
    ),
    "qwen2.5_1.5b": (
        dict(attn_bias=True, attn_out_bias=False, qk_norm=False, num_kv_heads=2, head_dim=128,
             attention_layers=(), tie_embeddings=True),
        1.54e9,
    ),
    "gemma3_270m": (
        dict(attention_layers=_LOCAL_GLOBAL * 3, local_window=512, norm_offset=1.0,
             post_norms=True, qk_norm=True, attn_scale=256**-0.5, rope_theta=1e6,
             local_rope_theta=1e4, activation="gelu_pytorch_tanh", embed_scale=math.sqrt(640)),
        0.268e9,
    ),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(TODAYS_ROWS))
def test_todays_rows_read_as_their_family(model):
    import jax

    from tsld_jax.models import decoder
    from tsld_jax.models.spec import spec_from_hf_config

    sys.path.insert(0, ROOT)
    try:
        from configs import paper
    finally:
        sys.path.remove(ROOT)
    features, count = TODAYS_ROWS[model]
    spec = spec_from_hf_config(paper.HF_CONFIGS[paper.TABLE[model][0]])
    assert {name: getattr(spec, name) for name in features} == features
    shapes = decoder.param_shapes(spec)
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert sum(math.prod(shape) for shape in leaves) == pytest.approx(count, rel=0.02)


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
        ("--config.model.attention=flash", "model.attention"),
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


@pytest.mark.parametrize(
    "target, devices", [("8xa100", 8), ("1xh100", 1), ("v5p-8", 4), ("v6e-8", 8), ("", 1), ("", 4)]
)
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

"""The family registry: config parsing wherever transformers keeps a field, refusals by name,
the default quantization rules over every family, and no family named outside the registry.

(Logits, cached generation and save_hf of every family against transformers: models_test.py
and generate_test.py, over tiny_models.CONFIGS; GGUF and llama.cpp: export_gguf_test.py.)
"""

import dataclasses
import math
import pathlib
import re

import numpy as np
import pytest
import tiny_models

from tsld_jax.models import decoder, families, gguf_export, spec_from_hf_config
from tsld_jax.models.families import llama
from tsld_jax.models.spec import ConfigError
from tsld_jax.quant import rules

ROOT = pathlib.Path(__file__).resolve().parents[1]

LLAMA = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LLAMA3 = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_every_config_of_the_tiny_models_has_a_family():
    for name, make in tiny_models.CONFIGS.items():
        spec = spec_from_hf_config(make().to_dict())
        assert spec.family in families.names(), name


def test_rope_fields_are_read_where_transformers_4_and_5_keep_them():
    v4 = spec_from_hf_config(
        {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    )
    v5 = spec_from_hf_config(
        {**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    )
    assert v4 == v5
    assert (v5.rope_type, v5.rope_factor, v5.rope_original_positions) == ("llama3", 32.0, 8192)
    # transformers 4.x wrote the kind under "type" too.
    old = spec_from_hf_config({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.rope_type, old.rope_factor, old.rope_theta) == ("linear", 2.0, 10000.0)


def test_gemma3_reads_the_4x_and_5x_layouts_alike():
    base = {
        **LLAMA,
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 4,
    }
    v4 = spec_from_hf_config(
        {
            **base,
            "rope_theta": 1e6,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6,
        }
    )
    v5 = spec_from_hf_config(
        {
            **base,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        }
    )
    assert v4 == v5
    assert v5.attention_layers == ("local",) * 5 + ("global",)
    assert (v5.rope_theta, v5.local_rope_theta, v5.rope_factor) == (1e6, 10000.0, 8.0)
    assert v5.embed_scale == math.sqrt(32) and v5.attn_scale == 8**-0.5 and v5.norm_offset == 1


def test_qwen_sliding_window_only_when_enabled():
    qwen = {**LLAMA, "model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 8}
    assert spec_from_hf_config(qwen | {"use_sliding_window": False}).attention_layers == ()
    enabled = spec_from_hf_config(qwen | {"use_sliding_window": True, "max_window_layers": 2})
    assert enabled.attention_layers == ("global", "global", "local", "local")
    assert enabled.local_window == 8
    assert (enabled.attn_bias, enabled.attn_out_bias) == (True, False)


def test_llama3_divisors_equal_the_llama_cpp_converters():
    # convert_hf_to_gguf.py's rope_freqs for Llama 3.1/3.2, written out independently.
    spec = spec_from_hf_config(
        {
            **LLAMA,
            "head_dim": 64,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3},
        }
    )
    base = 500000.0 ** -(np.arange(0, 64, 2) / 64)
    low, high = 8192 / 1.0, 8192 / 4.0
    want = []
    for freq in base:
        wavelength = 2 * math.pi / freq
        if wavelength < high:
            want.append(1.0)
        elif wavelength > low:
            want.append(32.0)
        else:
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 32.0 + smooth))
    np.testing.assert_allclose(llama.rope_divisors(spec), want, rtol=1e-5)
    assert min(want) == 1.0 and max(want) == 32.0  # all three regimes are exercised


@pytest.mark.parametrize(
    "config, message",
    [
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        (
            {**LLAMA, "model_type": "phi3", "rope_scaling": {"type": "longrope"}},
            "'longrope'",
        ),
        (
            {**LLAMA, "model_type": "phi3", "partial_rotary_factor": 0.75},
            "partial rotary",
        ),
        ({**LLAMA, "model_type": "mamba"}, "model_type='mamba'; supported: gemma2, gemma3_text"),
    ],
    ids=["yarn", "dynamic", "longrope", "partial-rotary", "unknown"],
)
def test_what_the_decoder_lacks_is_refused_by_name(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_from_hf_config(config)


@pytest.mark.parametrize("name", sorted(tiny_models.CONFIGS))
def test_default_rules_quantize_every_block_linear_and_nothing_else(name):
    spec = spec_from_hf_config(tiny_models.CONFIGS[name]().to_dict())
    shapes = decoder.param_shapes(spec)
    leaves = [
        "/".join(p.key for p in path)
        for path, _ in __import__("jax").tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    ]
    quantized = {leaf for leaf in leaves if rules.match(leaf, rules.default_rules()) is not None}
    linears = {f"layers/{m}/kernel" for m in decoder.LINEAR_NAMES if f"layers/{m}/kernel" in leaves}
    assert quantized == linears
    assert len(linears) == (7 if spec.gated_mlp else 6)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("mistral_window", {}, "no sliding-window layers"),
        ("gemma3", {"attn_scale": 8**-0.5, "local_rope_theta": 1e4}, "every 6th layer global"),
        ("gemma3", {}, "attn_scale=0.35"),  # llama.cpp's scale is 1/sqrt(head_dim)
        ("phi3_window", {}, r"ignores the sliding window \(3\)"),
        ("qwen3", {"qk_norm": False}, "qk_norm=True"),
        ("opt_pre", {}, "no architecture for the opt family"),
    ],
)
def test_llama_cpp_graphs_that_compute_otherwise_are_refused(name, change, message):
    spec = spec_from_hf_config(tiny_models.CONFIGS[name]().to_dict())
    spec = dataclasses.replace(spec, **change)
    with pytest.raises(gguf_export.ExportError, match=message) as error:
        gguf_export.check_supported(spec)
    assert "\n" not in str(error.value)


def test_no_family_is_named_outside_the_registry():
    """The decoder, loaders and exporters read feature fields, never a family's name."""
    pattern = re.compile(r"""(family|model_type)["']?[\])]?\s*(==|!=|\bin\b|\bnot in\b)""")
    offenders = []
    for path in sorted((ROOT / "tsld_jax").rglob("*.py")):
        if "families" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_gemma_embedding_scale_is_rounded_to_the_embedding_dtype():
    """transformers multiplies Gemma's embeddings by sqrt(hidden) cast to the weights' dtype:
    in bfloat16, sqrt(640) = 25.298 becomes 25.25."""
    import jax.numpy as jnp
    import ml_dtypes

    spec = spec_from_hf_config(tiny_models.CONFIGS["gemma3"]().to_dict())
    spec = dataclasses.replace(spec, embed_scale=math.sqrt(640))
    table = np.random.default_rng(0).standard_normal((spec.vocab_size, 32)).astype(np.float32)
    table = table.astype(ml_dtypes.bfloat16)
    tokens = np.array([[3, 1, 4, 1, 5]])
    got = decoder.embed({"embed": {"tokens": jnp.asarray(table)}}, tokens, tokens * 0, spec)
    want = (table[tokens].astype(np.float32) * np.float32(25.25)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(got), want)
    unrounded = (table[tokens].astype(np.float32) * np.float32(math.sqrt(640))).astype(
        ml_dtypes.bfloat16
    )
    assert not np.array_equal(np.asarray(got), unrounded)  # the rounding is visible

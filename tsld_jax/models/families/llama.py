"""LLaMA 1/2, Llama 3.x and SmolLM: RMSNorm, SwiGLU, rotary embeddings with grouped-query
attention; Llama 3.1/3.2 rescale the rotary frequencies ("llama3" rope type), which llama.cpp
reads as a `rope_freqs` tensor of per-frequency divisors."""

from __future__ import annotations

from typing import Any

import numpy as np

from tsld_jax.models import families
from tsld_jax.models.spec import ConfigError, ModelSpec

HF_MODULES = {
    "embed/tokens": "embed_tokens",
    "final_norm": "norm",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj",
    "mlp/gate": "mlp.gate_proj",
    "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}
# Meta's Llama 3.1/3.2 rescaling (the factor is 8 for 3.1, 32 for 3.2). A GGUF file keeps only
# the resulting divisors; these fill in what they cannot tell.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original": 8192}


def spec_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ModelSpec fields of the LLaMA layout, shared by the families built on it."""
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        num_layers=cfg["num_hidden_layers"],
        num_heads=h,
        num_kv_heads=families.get_field(cfg, "num_key_value_heads", default=h),
        head_dim=families.get_field(cfg, "head_dim", default=d // h),
        mlp_size=cfg["intermediate_size"],
        norm="rmsnorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation=cfg.get("hidden_act", "silu"),
        gated_mlp=True,
        positional="rotary",
        attn_bias=cfg.get("attention_bias", False),
        attn_out_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        **families.rope_fields(cfg),
    )


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec(family="llama", **spec_fields(cfg))


def rope_divisors(spec: ModelSpec) -> np.ndarray:
    """llama.cpp's `rope_freqs`: each inverse frequency's divisor under the llama3 scaling."""
    plain = spec.inv_frequencies(spec.rope_theta, scaled=False)
    return (plain / spec.inv_frequencies(spec.rope_theta, scaled=True)).astype(np.float32)


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    cfg = families.llama_like_config(
        get, shapes, "llama", architectures=["LlamaForCausalLM"], hidden_act="silu"
    )
    if "rope_freqs.weight" in shapes:
        original = int(get("rope.scaling.original_context_length", _LLAMA3_DEFAULTS["original"]))
        cfg["rope_parameters"] = _llama3_rope(cfg, read("rope_freqs.weight"), original)
    elif get("rope.scaling.type", None) == "linear":
        cfg["rope_parameters"] |= {
            "rope_type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    return cfg


def _llama3_rope(cfg: dict[str, Any], divisors: np.ndarray, original: int) -> dict[str, Any]:
    """Llama 3's rope parameters from llama.cpp's `rope_freqs` divisors.

    Between the two bands (divisor 1, divisor = factor) the scaling interpolates with
    s = (original / wavelength - low) / (high - low), linear in 1 / wavelength; s = 0 and 1 are
    the band edges. So the divisors fix the factor and that line (fitted here), and with the
    original context (written by our exporter as rope.scaling.original_context_length; Meta's
    8192 otherwise) the low and high frequency factors.
    """
    factor = float(divisors.max())
    plain = spec_from_config(cfg).inv_frequencies(cfg["rope_parameters"]["rope_theta"], False)
    inverse_wavelength = plain / (2 * np.pi)
    medium = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor > 1 and medium.sum() >= 2:
        s = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inverse_wavelength[medium], s, 1)
        low = float(np.round(-intercept * original / slope, 6))
        high = float(np.round(low + original / slope, 6))
    else:
        low, high = _LLAMA3_DEFAULTS["low_freq_factor"], _LLAMA3_DEFAULTS["high_freq_factor"]
    rope = {
        "rope_type": "llama3",
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    spec = spec_from_config({**cfg, "rope_parameters": rope})
    if not np.allclose(rope_divisors(spec), divisors, rtol=1e-4, atol=0):
        raise ConfigError("the file's rope_freqs are not a Llama 3 frequency scaling")
    return rope


# What llama.cpp's graphs of the LLaMA layout (llama, qwen2, qwen3, phi3) compute: pre-norm
# RMSNorm blocks with SwiGLU and rotary embeddings, nothing of Gemma's or GPT-Neo's.
LLAMA_GRAPH = dict(
    norm="rmsnorm",
    norm_offset=0.0,
    activation="silu",
    gated_mlp=True,
    positional="rotary",
    pre_norm=True,
    post_norms=False,
    final_norm=True,
    attn_scale=0.0,
    attn_softcap=0.0,
    logit_softcap=0.0,
    embed_scale=0.0,
    embed_proj_dim=0,
)


def check(spec: ModelSpec, arch: str = "llama") -> None:
    """What llama.cpp's LLaMA graph computes (also Mistral's, which llama.cpp runs as LLaMA)."""
    families.require(spec, arch, qk_norm=False, **LLAMA_GRAPH)
    families.require_global(spec, arch)
    if spec.rope_type == "llama3" and spec.head_dim % 2:
        raise ConfigError("llama3 rope scaling needs an even head_dim")


def hparams(writer, spec: ModelSpec) -> None:
    import gguf

    if spec.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_factor)
    if spec.rope_type == "llama3":  # the divisors go in rope_freqs; this lets the import
        writer.add_rope_scaling_orig_ctx_len(spec.rope_original_positions)  # name the rest


def extra_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Tensors llama.cpp reads beside the weights: Llama 3's rope divisors."""
    return {"rope_freqs.weight": rope_divisors(spec)} if spec.rope_type == "llama3" else {}


FAMILY = families.Family(
    name="llama",
    model_types=("llama",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules=HF_MODULES,
    gguf=families.GgufArch(
        arch="llama",
        config=_config_from_gguf,
        check=check,
        hparams=hparams,
        extra_tensors=extra_tensors,
        permute_rotary=True,
    ),
)

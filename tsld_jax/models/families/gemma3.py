"""Gemma 3 (text): embeddings scaled by sqrt(hidden), RMSNorms that multiply by (1 + w), a norm
before and after both attention and MLP, GeGLU (tanh GELU), q/k RMSNorm per head, scores scaled
by query_pre_attn_scalar ** -0.5, and local (sliding-window) layers with their own RoPE base
between global ones (5 local, 1 global). llama.cpp's converter stores every norm as 1 + w."""

from __future__ import annotations

import math
from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import llama
from tsld_jax.models.spec import ConfigError, ModelSpec

HF_MODULES = {
    "embed/tokens": "embed_tokens",
    "final_norm": "norm",
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj",
    "attn/q_norm": "self_attn.q_norm",
    "attn/k_norm": "self_attn.k_norm",
    "mlp/gate": "mlp.gate_proj",
    "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}
# llama.cpp's Gemma 3 graph fixes what the HF config leaves free (llama-model.cpp).
_LLAMA_CPP_PATTERN = 6
_LLAMA_CPP_LOCAL_THETA = 10000.0


def gemma_fields(cfg: dict[str, Any], default_pattern: int) -> dict[str, Any]:
    """The ModelSpec fields shared by Gemma 2 and 3."""
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        kinds = families.layer_kinds(cfg, layers) or ("global",) * layers
    else:  # transformers 4.x: every `sliding_window_pattern`-th layer is global
        pattern = cfg.get("sliding_window_pattern", default_pattern)
        kinds = tuple("local" if (i + 1) % pattern else "global" for i in range(layers))
    fields = llama.spec_fields(cfg) | families.rope_fields(cfg, "full_attention")
    fields.update(
        activation=families.get_field(
            cfg, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"
        ),
        norm_offset=1.0,
        post_norms=True,
        attn_out_bias=cfg.get("attention_bias", False),
        attn_scale=float(cfg.get("query_pre_attn_scalar", fields["head_dim"])) ** -0.5,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        embed_scale=math.sqrt(d),
        local_window=int(cfg.get("sliding_window") or 0) if "local" in kinds else 0,
        attention_layers=kinds if "local" in kinds else (),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )
    return fields


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    fields = gemma_fields(cfg, _LLAMA_CPP_PATTERN)
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        local = families.rope_fields(cfg, "sliding_attention")
        if local["rope_type"] != "default":
            raise ConfigError(f"Gemma 3's local layers with rope type {local['rope_type']!r}")
        local_theta = local["rope_theta"]
    else:
        local_theta = float(cfg.get("rope_local_base_freq", _LLAMA_CPP_LOCAL_THETA))
    return ModelSpec(family="gemma3", qk_norm=True, local_rope_theta=local_theta, **fields)


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    cfg = families.llama_like_config(
        get,
        shapes,
        "gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=int(get("attention.sliding_window", 512)),
        sliding_window_pattern=_LLAMA_CPP_PATTERN,
        query_pre_attn_scalar=int(get("attention.key_length")),
        rope_local_base_freq=_LLAMA_CPP_LOCAL_THETA,
    )
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_theta"] = theta
    if get("rope.scaling.type", None) == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return cfg


def _check(spec: ModelSpec) -> None:
    families.require(
        spec,
        "gemma3",
        norm="rmsnorm",
        norm_offset=1.0,
        activation="gelu_pytorch_tanh",
        gated_mlp=True,
        positional="rotary",
        pre_norm=True,
        post_norms=True,
        final_norm=True,
        qk_norm=True,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        attn_softcap=0.0,
        logit_softcap=0.0,
        embed_scale=math.sqrt(spec.hidden_size),
        tie_embeddings=True,
        attn_scale=spec.head_dim**-0.5,
        local_rope_theta=_LLAMA_CPP_LOCAL_THETA,
    )
    if spec.rope_type not in ("default", "linear"):
        raise ConfigError(f"llama.cpp's gemma3 graph has no {spec.rope_type} rope scaling")
    pattern = tuple(
        "local" if (i + 1) % _LLAMA_CPP_PATTERN else "global" for i in range(spec.num_layers)
    )
    if spec.attention_layers != pattern:
        raise ConfigError(
            "llama.cpp's gemma3 graph makes every 6th layer global and the others local; "
            f"this model's layers are {spec.attention_layers}"
        )


def _hparams(writer, spec: ModelSpec) -> None:
    import gguf

    writer.add_sliding_window(spec.local_window)
    if spec.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_factor)


FAMILY = families.Family(
    name="gemma3",
    model_types=("gemma3_text",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules=HF_MODULES,
    gguf=families.GgufArch(arch="gemma3", config=_config_from_gguf, check=_check, hparams=_hparams),
)

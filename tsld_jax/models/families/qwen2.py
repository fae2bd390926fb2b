"""Qwen2 / Qwen2.5: LLaMA's layout with a bias on q, k and v (none on the output projection),
and optional sliding-window layers (from `max_window_layers` on, when `use_sliding_window`)."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import llama
from tsld_jax.models.spec import ModelSpec


def window_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """local_window / attention_layers of the Qwen configs: `layer_types` (transformers 5) or
    `use_sliding_window` + `max_window_layers` (4.x); the window is ignored unless enabled."""
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if cfg.get("layer_types"):
        kinds = families.layer_kinds(cfg, layers)
    elif window:
        first = cfg.get("max_window_layers", layers)
        kinds = tuple("local" if i >= first else "global" for i in range(layers))
        kinds = kinds if "local" in kinds else ()
    else:
        kinds = ()
    if kinds and not window:
        window = cfg.get("sliding_window")
    return {"local_window": int(window or 0) if kinds else 0, "attention_layers": kinds}


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    fields = llama.spec_fields(cfg) | window_fields(cfg)
    fields |= {"attn_bias": True, "attn_out_bias": False}
    return ModelSpec(family="qwen2", **fields)


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    return families.llama_like_config(
        get, shapes, "qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu"
    )


def check(spec: ModelSpec, arch: str = "qwen2", qk_norm: bool = False, bias: bool = True) -> None:
    """What llama.cpp's Qwen2 (and, with q/k norms and no biases, Qwen3) graph computes."""
    families.require(
        spec,
        arch,
        rope_type="default",
        qk_norm=qk_norm,
        attn_bias=bias,
        attn_out_bias=False,
        mlp_bias=False,
        **llama.LLAMA_GRAPH,
    )
    families.require_global(spec, arch)


FAMILY = families.Family(
    name="qwen2",
    model_types=("qwen2",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules=llama.HF_MODULES,
    gguf=families.GgufArch(arch="qwen2", config=_config_from_gguf, check=check),
)

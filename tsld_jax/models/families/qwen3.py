"""Qwen3: LLaMA's layout with an RMSNorm over each head's queries and keys before the rotary
embedding, an explicit head_dim, and biases only if `attention_bias` (then on all four)."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import llama, qwen2
from tsld_jax.models.spec import ModelSpec


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    fields = llama.spec_fields(cfg) | qwen2.window_fields(cfg)
    return ModelSpec(family="qwen3", qk_norm=True, **fields)


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    return families.llama_like_config(
        get, shapes, "qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu"
    )


def _check(spec: ModelSpec) -> None:
    qwen2.check(spec, "qwen3", qk_norm=True, bias=False)


FAMILY = families.Family(
    name="qwen3",
    model_types=("qwen3",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules=llama.HF_MODULES
    | {"attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm"},
    gguf=families.GgufArch(arch="qwen3", config=_config_from_gguf, check=_check),
)

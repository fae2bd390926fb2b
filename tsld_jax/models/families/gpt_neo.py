"""GPT-Neo: GPT-2's layout with unscaled attention, no q/k/v bias, and alternating global and
local (sliding-window) layers. llama.cpp has no GPT-Neo graph."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.spec import ModelSpec


def _layer_kinds(cfg: dict[str, Any]) -> tuple[str, ...]:
    if cfg.get("attention_layers"):
        return tuple(cfg["attention_layers"])
    kinds: list[str] = []
    for pattern, repeat in cfg["attention_types"]:
        for _ in range(repeat):
            kinds.extend(pattern)
    return tuple(kinds)


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    d, h = cfg["hidden_size"], cfg["num_heads"]
    return ModelSpec(
        family="gpt_neo",
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        num_layers=cfg["num_layers"],
        num_heads=h,
        num_kv_heads=h,
        head_dim=d // h,
        mlp_size=families.get_field(cfg, "intermediate_size", default=4 * d),
        max_positions=cfg["max_position_embeddings"],
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=cfg.get("activation_function", "gelu_new"),
        attn_bias=False,
        attn_scale=1.0,
        local_window=cfg.get("window_size", 256),
        attention_layers=_layer_kinds(cfg),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )


FAMILY = families.Family(
    name="gpt_neo",
    model_types=("gpt_neo",),
    spec_from_config=spec_from_config,
    hf_prefix="transformer.",
    hf_layer="h.{i}.",
    hf_modules={
        "embed/tokens": "wte",
        "positions": "wpe",
        "final_norm": "ln_f",
        "attn_norm": "ln_1",
        "mlp_norm": "ln_2",
        "attn/q": "attn.attention.q_proj",
        "attn/k": "attn.attention.k_proj",
        "attn/v": "attn.attention.v_proj",
        "attn/o": "attn.attention.out_proj",
        "mlp/up": "mlp.c_fc",
        "mlp/down": "mlp.c_proj",
    },
)

"""OPT: learned positions offset by 2, ReLU, pre- or post-norm (OPT-350m), and OPT-350m's
project_in/project_out around a narrower embedding. llama.cpp has no OPT graph."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.spec import ModelSpec


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    pre = cfg.get("do_layer_norm_before", True)
    proj = cfg.get("word_embed_proj_dim", d)
    bias = cfg.get("enable_bias", True)
    return ModelSpec(
        family="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        num_layers=cfg["num_hidden_layers"],
        num_heads=h,
        num_kv_heads=h,
        head_dim=d // h,
        mlp_size=cfg["ffn_dim"],
        max_positions=cfg["max_position_embeddings"] + 2,
        position_offset=2,
        activation=cfg.get("activation_function", "relu"),
        pre_norm=pre,
        final_norm=pre and not cfg.get("_remove_final_layer_norm", False),
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        embed_proj_dim=proj if proj != d else 0,
    )


FAMILY = families.Family(
    name="opt",
    model_types=("opt",),
    spec_from_config=spec_from_config,
    hf_prefix="model.decoder.",
    hf_layer="layers.{i}.",
    hf_modules={
        "embed/tokens": "embed_tokens",
        "positions": "embed_positions",
        "project_in": "project_in",
        "project_out": "project_out",
        "final_norm": "final_layer_norm",
        "attn_norm": "self_attn_layer_norm",
        "mlp_norm": "final_layer_norm",
        "attn/q": "self_attn.q_proj",
        "attn/k": "self_attn.k_proj",
        "attn/v": "self_attn.v_proj",
        "attn/o": "self_attn.out_proj",
        "mlp/up": "fc1",
        "mlp/down": "fc2",
    },
)

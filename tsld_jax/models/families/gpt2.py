"""GPT-2: learned positions, LayerNorm, tanh GELU, biases everywhere, Conv1D kernels stored
(in, out) and q/k/v fused in one `c_attn` (split here into our three linears)."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.spec import ModelSpec


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    d, h = cfg["n_embd"], cfg["n_head"]
    return ModelSpec(
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        num_layers=cfg["n_layer"],
        num_heads=h,
        num_kv_heads=h,
        head_dim=d // h,
        mlp_size=families.get_field(cfg, "n_inner", default=4 * d),
        max_positions=cfg["n_positions"],
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=cfg.get("activation_function", "gelu_new"),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    hidden = int(get("embedding_length"))
    positions = shapes["position_embd.weight"][0]
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "n_embd": hidden,
        "n_layer": int(get("block_count")),
        "n_head": int(get("attention.head_count")),
        "n_inner": int(get("feed_forward_length", 4 * hidden)),
        "n_positions": int(positions),
        "n_ctx": int(get("context_length", positions)),
        "layer_norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in shapes,
    }


def _check(spec: ModelSpec) -> None:
    families.require(
        spec,
        "gpt2",
        norm="layernorm",
        activation="gelu_new",
        gated_mlp=False,
        positional="learned",
        pre_norm=True,
        final_norm=True,
        attn_scale=0.0,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position_offset=0,
    )
    families.require_global(spec, "gpt2")


_QKV = ("attn/q", "attn/k", "attn/v")

FAMILY = families.Family(
    name="gpt2",
    model_types=("gpt2",),
    spec_from_config=spec_from_config,
    hf_prefix="transformer.",
    hf_layer="h.{i}.",
    hf_modules={
        "embed/tokens": "wte",
        "positions": "wpe",
        "final_norm": "ln_f",
        "attn_norm": "ln_1",
        "mlp_norm": "ln_2",
        "attn/o": "attn.c_proj",
        "mlp/up": "mlp.c_fc",
        "mlp/down": "mlp.c_proj",
    },
    hf_conv1d=True,
    hf_fused=(families.Fused("attn.c_attn", _QKV, axis=-1),),
    gguf=families.GgufArch(
        arch="gpt2",
        config=_config_from_gguf,
        check=_check,
        # llama.cpp's GPT-2 graph reads one fused QKV matrix, as Hugging Face stores it.
        fused=(families.Fused("ATTN_QKV", _QKV, axis=0),),
    ),
)

"""Phi-3: LLaMA's arithmetic with q/k/v stored as one `qkv_proj` and gate/up as one
`gate_up_proj`; they are split on import so that each projection is quantized by the rules as
in every other family, and joined again on export. A `sliding_window` applies to every layer.
`longrope` (Phi-3 128k) and partial rotary embeddings (Phi-3.5/4-mini) are refused by name."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import llama, qwen2
from tsld_jax.models.spec import ConfigError, ModelSpec

_QKV = ("attn/q", "attn/k", "attn/v")
_GATE_UP = ("mlp/gate", "mlp/up")


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(
            f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported"
        )
    window = cfg.get("sliding_window") or 0
    layers = ("local",) * cfg["num_hidden_layers"] if window else ()
    return ModelSpec(
        family="phi3", **llama.spec_fields(cfg), local_window=window, attention_layers=layers
    )


def _config_from_gguf(get, shapes, read) -> dict[str, Any]:
    window = int(get("attention.sliding_window", 0))
    return families.llama_like_config(
        get,
        shapes,
        "phi3",
        architectures=["Phi3ForCausalLM"],
        hidden_act="silu",
        sliding_window=window or None,
    )


def _check(spec: ModelSpec) -> None:
    if spec.attention_layers:
        # llama.cpp reads phi3.attention.sliding_window and then turns it off ("Phi SWA is
        # currently disabled", llama-model.cpp): its logits differ from the first token past
        # the window on (by far more than rounding: docs/benchmarks.md, "Measurements behind
        # design choices").
        raise ConfigError(
            f"llama.cpp's phi3 graph ignores the sliding window ({spec.local_window}) of this "
            "model, so its logits would differ beyond it"
        )
    qwen2.check(spec, "phi3", bias=False)  # the LLaMA graph without biases, fused on disk


FAMILY = families.Family(
    name="phi3",
    model_types=("phi3",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules={k: v for k, v in llama.HF_MODULES.items() if k not in _QKV + _GATE_UP},
    hf_fused=(
        families.Fused("self_attn.qkv_proj", _QKV, axis=0),
        families.Fused("mlp.gate_up_proj", _GATE_UP, axis=0),
    ),
    gguf=families.GgufArch(
        arch="phi3",
        config=_config_from_gguf,
        check=_check,
        fused=(
            families.Fused("ATTN_QKV", _QKV, axis=0),
            families.Fused("FFN_UP", _GATE_UP, axis=0),
        ),
    ),
)

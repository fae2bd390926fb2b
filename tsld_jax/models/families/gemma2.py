"""Gemma 2: Gemma 3's layout without q/k norms, with tanh soft-capping of the attention scores
and of the logits, one RoPE base, and local and global layers alternating (local first)."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import gemma3
from tsld_jax.models.spec import ModelSpec


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec(family="gemma2", **gemma3.gemma_fields(cfg, default_pattern=2))


FAMILY = families.Family(
    name="gemma2",
    model_types=("gemma2",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules={
        k: v for k, v in gemma3.HF_MODULES.items() if not k.endswith("_norm") or "/" not in k
    },
)

"""Mistral: LLaMA's layout with grouped-query attention and, in the first releases, a sliding
window over every layer. llama.cpp runs it as LLaMA (its graph has no window), so only
window-free checkpoints export to GGUF."""

from __future__ import annotations

from typing import Any

from tsld_jax.models import families
from tsld_jax.models.families import llama
from tsld_jax.models.spec import ModelSpec


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    window = cfg.get("sliding_window") or 0
    layers = ("local",) * cfg["num_hidden_layers"] if window else ()
    return ModelSpec(
        family="mistral", **llama.spec_fields(cfg), local_window=window, attention_layers=layers
    )


FAMILY = families.Family(
    name="mistral",
    model_types=("mistral",),
    spec_from_config=spec_from_config,
    hf_prefix="model.",
    hf_layer="layers.{i}.",
    hf_modules=llama.HF_MODULES,
    gguf=families.GgufArch(
        arch="llama",
        config=llama.FAMILY.gguf.config,
        check=llama.check,
        hparams=llama.hparams,
        extra_tensors=llama.extra_tensors,
        permute_rotary=True,
    ),
)

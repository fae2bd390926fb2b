"""The family registry: one module a family says everything that is particular to it.

A family module defines one `Family`: how its `config.json` becomes a `ModelSpec`, the names of
its tensors in Hugging Face checkpoints, which of its checkpoint tensors hold several of our
linears side by side (fused on disk, split here), and its llama.cpp (GGUF) architecture with the
metadata that architecture reads and writes. The decoder, the loaders (`hf.py`, `gguf.py`,
`sharded.py`) and the exporters (`gguf_export.py`) are generic over these records: none of them
tests a family's name.

Adding a family: write `families/<name>.py` with its `FAMILY`, add the module to `_MODULES`
below, and add a tiny random `transformers` model of each config variant to
`tests/tiny_models.py` (the parity, cache, save_hf and GGUF tests then run over it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from tsld_jax.models.spec import ConfigError, ModelSpec

# Registry order is the order of the README's model list.
_MODULES = (
    "gpt2",
    "opt",
    "llama",
    "mistral",
    "gpt_neo",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
)

# Our module names (paths in the parameter pytree, layers/ left out) -> llama.cpp's tensor kinds
# (`gguf.MODEL_TENSOR` member names). One table for every family: the pytree is the same.
GGUF_TENSORS = {
    "embed/tokens": "TOKEN_EMBD",
    "positions": "POS_EMBD",
    "final_norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
    "attn_norm": "ATTN_NORM",
    "post_attn_norm": "ATTN_POST_NORM",
    "mlp_norm": "FFN_NORM",
    "post_mlp_norm": "FFN_POST_NORM",
    "attn/q": "ATTN_Q",
    "attn/k": "ATTN_K",
    "attn/v": "ATTN_V",
    "attn/o": "ATTN_OUT",
    "attn/q_norm": "ATTN_Q_NORM",
    "attn/k_norm": "ATTN_K_NORM",
    "mlp/gate": "FFN_GATE",
    "mlp/up": "FFN_UP",
    "mlp/down": "FFN_DOWN",
}


@dataclasses.dataclass(frozen=True)
class Fused:
    """One stored tensor that holds several of our block linears, concatenated.

    Attributes:
      name: its name (a HF module relative to the block, or a GGUF tensor kind).
      parts: our modules, in their stored order (e.g. ("attn/q", "attn/k", "attn/v")).
      axis: the axis of the stored weight (and of its bias, if any) along which the parts lie.
    """

    name: str
    parts: tuple[str, ...]
    axis: int


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """A family's llama.cpp architecture.

    Attributes:
      arch: llama.cpp's architecture name (`general.architecture`).
      config: (metadata getter, tensor shapes by name, tensor reader) -> the HF config.json dict
        the file describes; the getter takes a key without the "<arch>." prefix and a default,
        shapes are numpy's (rows = output features), the reader dequantizes one tensor by name.
      check: raises `ConfigError` (one line) when llama.cpp's graph for `arch` computes something
        other than this spec.
      hparams: writes the metadata keys beyond the common ones (`gguf_export`), or None.
      extra_tensors: derived tensors llama.cpp reads beside the weights (name -> float32 array;
        Llama 3's rope_freqs), skipped on import.
      permute_rotary: llama.cpp's graph rotates interleaved pairs (LLaMA's), so the converter
        reorders the rows of q and k; the others rotate halves, as we do.
      fused: GGUF tensors holding several of our linears (GPT-2's and Phi-3's attn_qkv).
    """

    arch: str
    config: Callable[..., dict[str, Any]]
    check: Callable[[ModelSpec], None]
    hparams: Callable[[Any, ModelSpec], None] | None = None
    extra_tensors: Callable[[ModelSpec], Mapping[str, Any]] | None = None
    permute_rotary: bool = False
    fused: tuple[Fused, ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything particular to one family of checkpoints.

    Attributes:
      name: the registry name (`ModelSpec.family`).
      model_types: the HF `model_type` values it reads.
      spec_from_config: HF config.json dict -> ModelSpec.
      hf_prefix: the prefix of the base model's tensors ("model.").
      hf_layer: the prefix of block i's tensors, with "{i}" ("layers.{i}.").
      hf_modules: our module -> theirs (relative to the prefix, or to the block for layers/...).
      hf_conv1d: block kernels are stored (in, out) (GPT-2's Conv1D), not (out, in).
      hf_fused: stored tensors that hold several of our linears (split on import, joined on save).
      gguf: the llama.cpp architecture, or None where llama.cpp has none.
    """

    name: str
    model_types: tuple[str, ...]
    spec_from_config: Callable[[dict[str, Any]], ModelSpec]
    hf_prefix: str
    hf_layer: str
    hf_modules: Mapping[str, str]
    hf_conv1d: bool = False
    hf_fused: tuple[Fused, ...] = ()
    gguf: GgufArch | None = None


_REGISTRY: dict[str, Family] = {}


def _load() -> dict[str, Family]:
    if not _REGISTRY:
        for module in _MODULES:
            family = importlib.import_module(f"{__name__}.{module}").FAMILY
            _REGISTRY[family.name] = family
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every registered family's name."""
    return tuple(_MODULES)


def check_name(name: str) -> None:
    """Raises ConfigError unless `name` is a registered family."""
    if name not in _MODULES:
        raise ConfigError(f"unknown family {name!r}; expected one of {', '.join(_MODULES)}")


def get(name: str) -> Family:
    """The family of a spec (`get(spec.family)`)."""
    return _load()[name]


def for_hf_config(cfg: Mapping[str, Any]) -> Family:
    """The family that reads a HF config.json, by its model_type."""
    model_type = cfg.get("model_type")
    for family in _load().values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _load().values() for t in f.model_types)
    raise ConfigError(
        f"unknown architecture model_type={model_type!r}; supported: {', '.join(known)}"
    )


def for_gguf_arch(arch: str) -> Family:
    """The family that reads a GGUF file of llama.cpp architecture `arch`."""
    for family in _load().values():
        if family.gguf is not None and family.gguf.arch == arch:
            return family
    known = sorted(f.gguf.arch for f in _load().values() if f.gguf is not None)
    raise ConfigError(f"GGUF architecture {arch!r} is not supported (only {', '.join(known)})")


# --- Helpers for the family modules ------------------------------------------------------------


def get_field(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` that the config sets (not None), else `default`."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def rope_fields(cfg: Mapping[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """ModelSpec's rope_* fields from a config, wherever transformers keeps them: top-level
    `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x; per layer type for models
    with two rotary embeddings, Gemma 3). Refuses, by name, the kinds the decoder lacks."""
    params = cfg.get("rope_parameters") or {}
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]
    scaling = cfg.get("rope_scaling") or {}
    if layer_type is not None and isinstance(scaling.get(layer_type), Mapping):
        scaling = scaling[layer_type]
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type")) or "default"
    theta = float(get_field(merged, "rope_theta", default=cfg.get("rope_theta", 10000.0)))
    fields: dict[str, Any] = {"rope_theta": theta, "rope_type": kind}
    if kind == "default":
        return fields
    if kind == "linear":
        return fields | {"rope_factor": float(merged["factor"])}
    if kind == "llama3":
        return fields | {
            "rope_factor": float(merged["factor"]),
            "rope_low_freq_factor": float(merged["low_freq_factor"]),
            "rope_high_freq_factor": float(merged["high_freq_factor"]),
            "rope_original_positions": int(merged["original_max_position_embeddings"]),
        }
    raise ConfigError(
        f"rope type {kind!r} is not supported (only default, linear and llama3); "
        "its frequencies depend on the sequence length"
        if kind in ("dynamic", "longrope", "yarn", "su")
        else f"rope type {kind!r} is not supported (only default, linear and llama3)"
    )


def layer_kinds(cfg: Mapping[str, Any], num_layers: int) -> tuple[str, ...]:
    """Per layer "global" or "local", from transformers' `layer_types` ("full_attention" /
    "sliding_attention"); empty when every layer is global."""
    types = cfg.get("layer_types")
    if not types:
        return ()
    if len(types) != num_layers:
        raise ConfigError(f"layer_types names {len(types)} layers, the model has {num_layers}")
    kinds = []
    for kind in types:
        if kind not in ("full_attention", "sliding_attention"):
            raise ConfigError(f"layer type {kind!r} is not supported")
        kinds.append("local" if kind == "sliding_attention" else "global")
    return () if "local" not in kinds else tuple(kinds)


def require(spec: ModelSpec, arch: str, **wanted: Any) -> None:
    """Raises ConfigError unless every field of `spec` named in `wanted` has that value."""
    for field, value in wanted.items():
        if getattr(spec, field) != value:
            raise ConfigError(
                f"llama.cpp's {arch} graph needs {field}={value!r}, this model has "
                f"{getattr(spec, field)!r}"
            )


def require_global(spec: ModelSpec, arch: str) -> None:
    """Raises ConfigError when a layer has a sliding window: `arch` has none."""
    if "local" in spec.attention_layers:
        raise ConfigError(
            f"llama.cpp's {arch} graph has no sliding-window layers; this model has "
            f"{spec.attention_layers.count('local')} (window {spec.local_window})"
        )


def llama_like_config(
    get: Callable[..., Any], shapes: Mapping[str, tuple[int, ...]], model_type: str, **extra: Any
) -> dict[str, Any]:
    """The config.json of a rotary RMSNorm family from llama.cpp's common metadata keys."""
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    return {
        "model_type": model_type,
        "vocab_size": int(get("vocab_size", shapes["token_embd.weight"][0])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(get("rope.freq_base", 10000.0)),
        },
        "tie_word_embeddings": "output.weight" not in shapes,
        **extra,
    }

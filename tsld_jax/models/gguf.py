"""GGUF files (llama.cpp's format) into our parameter pytree, dequantized to float.

Reads the llama and gpt2 architectures, in any type `gguf.quants` dequantizes (F32, F16, Q8_0,
Q4_1, TQ1_0, TQ2_0, ...), so `gguf_export`'s files round-trip.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tsld_jax.models import hf
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import spec_from_hf_config

# GGUF tensor name -> Hugging Face LLaMA name; `hf.params_from_hf_tensors` does the rest, so the
# one LLaMA name table in hf.py stays the only one.
_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF -> Hugging Face GPT-2 names. GPT-2's Conv1D kernels are stored (in, out) by Hugging Face
# and (out, in) in GGUF: the names in _GPT2_CONV1D are transposed on the way in.
_GPT2_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_ARCHITECTURES = ("llama", "gpt2")


def _reader(path: str):
    import gguf as gguf_lib

    try:
        return gguf_lib.GGUFReader(path)
    except Exception as error:  # gguf raises ValueError, struct.error, ... on a bad file.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoadError(f"{path}: unreadable GGUF file ({message})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def hf_config_from_gguf(path: str, reader=None) -> dict[str, Any]:
    """The Hugging Face config.json dictionary that a GGUF file's metadata describes."""
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        supported = ", ".join(_ARCHITECTURES)
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (only {supported})")
    tensor_names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if arch == "gpt2":
        hidden = int(_field(reader, "gpt2.embedding_length"))
        positions = next(t for t in reader.tensors if t.name == "position_embd.weight")
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": int(embed.shape[-1]),
            "n_embd": hidden,
            "n_layer": int(_field(reader, "gpt2.block_count")),
            "n_head": int(_field(reader, "gpt2.attention.head_count")),
            "n_inner": int(_field(reader, "gpt2.feed_forward_length", 4 * hidden)),
            "n_positions": int(positions.shape[-1]),
            "n_ctx": int(_field(reader, "gpt2.context_length", positions.shape[-1])),
            "layer_norm_epsilon": float(_field(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)),
            "activation_function": "gelu_new",
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        }
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(_field(reader, "llama.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        },
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the rotary halves of q and k; undo it for the
    # rotate-half convention of the Hugging Face (and our) rotary embedding.
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def read_gguf_tensors(path: str, hf_config: dict[str, Any], reader=None) -> dict[str, np.ndarray]:
    """All tensors of a LLaMA or GPT-2 GGUF file, dequantized to float32, under HF names."""
    import gguf as gguf_lib

    reader = reader or _reader(path)
    gpt2 = hf_config["model_type"] == "gpt2"
    names, layer = (_GPT2_NAMES, "transformer.h") if gpt2 else (_LLAMA_NAMES, "model.layers")
    tensors = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        try:
            if parts[0] == "blk":
                name = f"{layer}.{parts[1]}.{names[parts[2]]}.{parts[3]}"
            else:
                name = f"{names[parts[0]]}.{parts[1]}"
        except (KeyError, IndexError):
            continue  # e.g. rope_freqs: derived data we recompute.
        try:
            values = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as error:
            raise LoadError(f"{path}: cannot dequantize {tensor.name} ({error})") from None
        values = np.asarray(values, dtype=np.float32)
        if gpt2:
            if parts[0] == "blk" and parts[2] in _GPT2_CONV1D and parts[3] == "weight":
                values = values.T
            tensors[name] = values
            continue
        if ".q_proj." in name:
            values = _unpermute(values, hf_config["num_attention_heads"])
        elif ".k_proj." in name:
            values = _unpermute(values, hf_config["num_key_value_heads"])
        tensors[name] = values
    return tensors


def load_gguf(path: str):
    """Reads a GGUF file once: (hf_config dict, ModelSpec, numpy params)."""
    reader = _reader(path)
    hf_config = hf_config_from_gguf(path, reader)
    spec = spec_from_hf_config(hf_config)
    return (
        hf_config,
        spec,
        hf.params_from_hf_tensors(read_gguf_tensors(path, hf_config, reader), spec),
    )


def _is_byte_vocabulary(reader) -> bool:
    # The vocabulary `gguf_export.vocab_from_bytes` writes for byte-tokenizer models.
    from tsld_jax.models import gguf_export

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    merges = reader.fields.get("tokenizer.ggml.merges")
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or tokens is None:
        return False
    if merges is not None and len(merges.data) > 1:
        return False
    values = tokens.contents()
    return values[:256] == gguf_export.byte_alphabet() and all(
        token.startswith("[PAD") for token in values[256:]
    )


def load_tokenizer(path: str):
    """The tokenizer of a GGUF file, converted by transformers once and cached on disk.

    A byte vocabulary (ids are byte values, as `gguf_export` writes for random models) is
    `named.ByteTokenizer`.

    The conversion takes ~15 s for a 49k-token vocabulary; the cached fast tokenizer loads in
    well under a second. The cache key is the file's absolute path, size and modification time.
    """
    import hashlib

    from transformers import AutoTokenizer

    from tsld_jax.models import named

    if _is_byte_vocabulary(_reader(path)):
        return named.ByteTokenizer()
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache_root = os.environ.get(
        "TSLD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax")
    )
    cache = os.path.join(cache_root, "gguf_tokenizers", key.hexdigest()[:16])
    if os.path.exists(os.path.join(cache, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # A damaged cache entry: convert again below.
            pass
    directory, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as error:
        raise LoadError(
            f"{path}: cannot build the tokenizer from GGUF metadata ({error})"
        ) from None
    try:
        tokenizer.save_pretrained(cache)
    except OSError:
        pass  # A read-only home: no cache, just slower next time.
    return tokenizer

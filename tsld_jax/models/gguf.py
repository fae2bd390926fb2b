"""GGUF files (llama.cpp's format) into our parameter pytree, dequantized to float.

Reads every llama.cpp architecture of the family registry (`families/<family>.py`: llama,
gpt2, qwen2, qwen3, gemma3, phi3), in any type `gguf.quants` dequantizes (F32, F16, Q8_0,
Q4_K, Q6_K, TQ1_0, TQ2_0, ...), so `gguf_export`'s files round-trip. Tensors map straight to
our pytree through `families.GGUF_TENSORS`; what differs between families (the metadata, fused
tensors, LLaMA's interleaved rotary rows, Gemma's norms stored as 1 + w) comes from the
family's record and the spec, never from a test of its name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tsld_jax.models import decoder, families
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec


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


_REQUIRED = object()  # a metadata key without a default


def _numpy_shape(tensor) -> tuple[int, ...]:
    # gguf-py lists a tensor's dimensions fastest-first (ggml's ne); numpy's order is reversed.
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(path: str, tensor) -> np.ndarray:
    import gguf as gguf_lib

    try:
        values = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as error:
        raise LoadError(f"{path}: cannot dequantize {tensor.name} ({error})") from None
    return np.asarray(values, dtype=np.float32).reshape(_numpy_shape(tensor))


def hf_config_from_gguf(path: str, reader=None) -> dict[str, Any]:
    """The Hugging Face config.json dictionary that a GGUF file's metadata describes."""
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    try:
        family = families.for_gguf_arch(arch)
    except ValueError as error:
        raise LoadError(f"{path}: {error}") from None
    by_name = {t.name: t for t in reader.tensors}
    shapes = {name: _numpy_shape(t) for name, t in by_name.items()}

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise LoadError(f"{path}: the GGUF metadata has no {arch}.{key}")
        return value

    def read(name: str) -> np.ndarray:
        return _dequantize(path, by_name[name])

    try:
        config = family.gguf.config(get, shapes, read)
    except KeyError as error:
        raise LoadError(f"{path}: the GGUF file has no tensor {error}") from None
    config["bos_token_id"] = _field(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = _field(reader, "tokenizer.ggml.eos_token_id")
    return config


def tensor_name(module: str, layer: int | None) -> str:
    """llama.cpp's name of one of our modules ("attn/q", layer 3 -> "blk.3.attn_q")."""
    import gguf as gguf_lib

    kind = getattr(gguf_lib.MODEL_TENSOR, families.GGUF_TENSORS[module])
    name = gguf_lib.TENSOR_NAMES[kind]
    return name.format(bid=layer) if layer is not None else name


def permute_rotary(weights: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's LLaMA graph rotates interleaved (even, odd) pairs; the Hugging Face layout (and
    ours) rotates halves. Its converter reorders the rows of q and k (and their biases) head by
    head; `inverse` undoes it."""
    half = weights.shape[0] // heads // 2
    split = (heads, half, 2) if inverse else (heads, 2, half)
    return weights.reshape(*split, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def fused_parts(spec: ModelSpec) -> dict[str, tuple[families.Fused, int, int]]:
    """Our module -> (the GGUF tensor holding it, its first row there, its rows)."""
    parts = {}
    layers = decoder.param_shapes(spec)["layers"]
    for fused in families.get(spec.family).gguf.fused:
        offset = 0
        for module in fused.parts:
            group, name = module.split("/")
            rows = layers[group][name]["kernel"][-1]
            parts[module] = (fused, offset, rows)
            offset += rows
    return parts


def leaf_sources(spec: ModelSpec):
    """Yields (our leaf path, module, GGUF suffix, per-layer?) for every parameter."""
    for path in _leaf_paths(decoder.param_shapes(spec)):
        per_layer = path[0] == "layers"
        module_path = path[1:] if per_layer else path
        leaf = module_path[-1]
        if leaf in ("kernel", "bias", "scale"):
            module, suffix = "/".join(module_path[:-1]), "bias" if leaf == "bias" else "weight"
        else:
            module, suffix = "/".join(module_path), "weight"
        yield path, module, suffix, per_layer


def _leaf_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths.extend(_leaf_paths(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths


def read_params(path: str, spec: ModelSpec, reader=None) -> dict[str, Any]:
    """Every parameter of a GGUF file as our numpy pytree (float32)."""
    from tsld_jax.models import hf

    reader = reader or _reader(path)
    arch = families.get(spec.family).gguf
    by_name = {t.name: t for t in reader.tensors}
    fused = fused_parts(spec)
    expected = decoder.param_shapes(spec)
    heads = {"attn/q": spec.num_heads, "attn/k": spec.num_kv_heads}
    params: dict[str, Any] = {}
    for leaf_path, module, suffix, per_layer in leaf_sources(spec):
        layers = range(spec.num_layers) if per_layer else [None]
        arrays = []
        for i in layers:
            if module in fused:
                holder, start, rows = fused[module]
                name = f"{_fused_tensor_name(holder.name, i)}.{suffix}"
            else:
                name, start, rows = f"{tensor_name(module, i)}.{suffix}", 0, None
            if name not in by_name:
                raise LoadError(
                    f"{path}: the GGUF file has no tensor {name!r} (needed for "
                    f"{'/'.join(leaf_path)})"
                )
            value = _dequantize(path, by_name[name])
            if rows is not None:
                value = value[start : start + rows]
            if arch.permute_rotary and module in heads:
                value = permute_rotary(value, heads[module], inverse=True)
            if leaf_path[-1] == "scale" and spec.norm_offset:
                value = value - np.float32(spec.norm_offset)  # stored as offset + w
            if leaf_path[-1] == "kernel":
                value = value.T  # GGUF rows are output features; our kernels are (in, out)
            arrays.append(value)
        value = np.stack(arrays) if per_layer else arrays[0]
        want = tuple(hf._get(expected, leaf_path))
        if value.shape != want:
            raise LoadError(
                f"{path}: {'/'.join(leaf_path)} has shape {value.shape} in the file, the "
                f"metadata implies {want}"
            )
        hf._set(params, leaf_path, np.ascontiguousarray(value, dtype=np.float32))
    return params


def _fused_tensor_name(kind: str, layer: int) -> str:
    import gguf as gguf_lib

    return gguf_lib.TENSOR_NAMES[getattr(gguf_lib.MODEL_TENSOR, kind)].format(bid=layer)


def load_gguf(path: str):
    """Reads a GGUF file once: (hf_config dict, ModelSpec, numpy params)."""
    from tsld_jax.models.spec import spec_from_hf_config

    reader = _reader(path)
    hf_config = hf_config_from_gguf(path, reader)
    spec = spec_from_hf_config(hf_config)
    return hf_config, spec, read_params(path, spec, reader)


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

    The conversion takes seconds for a large vocabulary; the cached fast tokenizer loads far
    faster (docs/benchmarks.md, "Measurements behind design choices"). The cache key is the
    file's absolute path, size and modification time.
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

"""Hugging Face checkpoints to and from our parameter pytree, one name table per family."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from tsld_jax.models import decoder
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec

# Per family: the prefix of the base model's weights, the prefix of one block, whether the block's
# kernels are GPT-2 Conv1D weights (stored (in, out), so no transpose), and our module name ->
# theirs. GPT-2's fused c_attn is split into virtual "attn.q/k/v" names on import and fused back
# on export (see _split_gpt2_qkv).
_TABLES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "prefix": "transformer.",
        "layer": "h.{i}.",
        "conv1d": True,
        "modules": {
            "embed/tokens": "wte",
            "positions": "wpe",
            "final_norm": "ln_f",
            "attn_norm": "ln_1",
            "mlp_norm": "ln_2",
            "attn/q": "attn.q",
            "attn/k": "attn.k",
            "attn/v": "attn.v",
            "attn/o": "attn.c_proj",
            "mlp/up": "mlp.c_fc",
            "mlp/down": "mlp.c_proj",
        },
    },
    "opt": {
        "prefix": "model.decoder.",
        "layer": "layers.{i}.",
        "conv1d": False,
        "modules": {
            "embed/tokens": "embed_tokens",
            "positions": "embed_positions",
            "project_in": "project_in",
            "project_out": "project_out",
            "final_norm": "final_layer_norm",
            "attn_norm": "self_attn_layer_norm",
            "mlp_norm": "final_layer_norm",
            "attn/q": "self_attn.q_proj",
            "attn/k": "self_attn.k_proj",
            "attn/v": "self_attn.v_proj",
            "attn/o": "self_attn.out_proj",
            "mlp/up": "fc1",
            "mlp/down": "fc2",
        },
    },
    "llama": {
        "prefix": "model.",
        "layer": "layers.{i}.",
        "conv1d": False,
        "modules": {
            "embed/tokens": "embed_tokens",
            "final_norm": "norm",
            "attn_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "attn/q": "self_attn.q_proj",
            "attn/k": "self_attn.k_proj",
            "attn/v": "self_attn.v_proj",
            "attn/o": "self_attn.o_proj",
            "mlp/gate": "mlp.gate_proj",
            "mlp/up": "mlp.up_proj",
            "mlp/down": "mlp.down_proj",
        },
    },
    "gpt_neo": {
        "prefix": "transformer.",
        "layer": "h.{i}.",
        "conv1d": False,
        "modules": {
            "embed/tokens": "wte",
            "positions": "wpe",
            "final_norm": "ln_f",
            "attn_norm": "ln_1",
            "mlp_norm": "ln_2",
            "attn/q": "attn.attention.q_proj",
            "attn/k": "attn.attention.k_proj",
            "attn/v": "attn.attention.v_proj",
            "attn/o": "attn.attention.out_proj",
            "mlp/up": "mlp.c_fc",
            "mlp/down": "mlp.c_proj",
        },
    },
}


def _leaf_entries(spec: ModelSpec) -> Iterator[tuple[tuple[str, ...], str, bool, bool]]:
    """Yields (our path, their name with {i} for a layer, transpose?, per-layer?) per leaf."""
    table = _TABLES[spec.family]
    shapes = decoder.param_shapes(spec)
    leaves = _flatten(shapes)
    for path in leaves:
        in_layers = path[0] == "layers"
        module_path = path[1:] if in_layers else path
        if module_path == ("lm_head", "kernel"):
            yield path, "lm_head.weight", True, False
            continue
        leaf = module_path[-1]
        if leaf in ("kernel", "bias", "scale"):
            module, suffix = "/".join(module_path[:-1]), "bias" if leaf == "bias" else "weight"
        else:
            module, suffix = "/".join(module_path), "weight"
        name = table["modules"][module] + "." + suffix
        name = table["prefix"] + (table["layer"] if in_layers else "") + name
        transpose = leaf == "kernel" and not (in_layers and table["conv1d"])
        yield path, name, transpose, in_layers


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths.extend(_flatten(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _split_gpt2_qkv(tensors: dict[str, np.ndarray], num_layers: int) -> None:
    for i in range(num_layers):
        base = f"transformer.h.{i}.attn."
        for suffix in ("weight", "bias"):
            fused = tensors.pop(base + "c_attn." + suffix, None)
            if fused is None:
                continue
            if fused.shape[-1] % 3:
                raise LoadError(
                    f"tensor {base + 'c_attn.' + suffix!r} has shape {tuple(fused.shape)}; its "
                    "last axis must hold q, k and v (a multiple of 3)"
                )
            for part, name in zip(np.split(fused, 3, axis=-1), "qkv", strict=True):
                tensors[base + name + "." + suffix] = part


def _fuse_gpt2_qkv(tensors: dict[str, np.ndarray], num_layers: int) -> None:
    for i in range(num_layers):
        base = f"transformer.h.{i}.attn."
        for suffix in ("weight", "bias"):
            parts = [tensors.pop(base + name + "." + suffix) for name in "qkv"]
            tensors[base + "c_attn." + suffix] = np.concatenate(parts, axis=-1)


def _normalise_names(tensors: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    # Base-model checkpoints (GPT2Model rather than GPT2LMHeadModel) omit the prefix.
    prefix = _TABLES[spec.family]["prefix"]
    out = {}
    for name, value in tensors.items():
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        out[name] = value
    return out


def params_from_hf_tensors(tensors: dict[str, np.ndarray], spec: ModelSpec, dtype=np.float32):
    """Converts a flat {hf name: array} dict into our nested parameter pytree (numpy leaves)."""
    tensors = _normalise_names(tensors, spec)
    if spec.family == "gpt2":
        _split_gpt2_qkv(tensors, spec.num_layers)
    params: dict[str, Any] = {}
    expected_shapes = decoder.param_shapes(spec)
    for path, name, transpose, per_layer in _leaf_entries(spec):
        names = [name.format(i=i) for i in range(spec.num_layers)] if per_layer else [name]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise LoadError(
                f"checkpoint has no tensor {missing[0]!r} (needed for {'/'.join(path)})"
            )
        want = tuple(_get(expected_shapes, path))[1 if per_layer else 0 :]
        want = want[::-1] if transpose else want  # as the checkpoint stores it
        for n in names:
            if tuple(tensors[n].shape) != want:
                raise LoadError(
                    f"tensor {n!r} has shape {tuple(tensors[n].shape)} but the model's "
                    f"config.json implies {want}"
                )
        arrays = [np.asarray(tensors[n], dtype=dtype) for n in names]
        if transpose:
            arrays = [a.T for a in arrays]
        value = np.stack(arrays) if per_layer else arrays[0]
        _set(params, path, np.ascontiguousarray(value))
    _check_shapes(params, spec)
    return params


def _check_shapes(params: dict[str, Any], spec: ModelSpec) -> None:
    expected = decoder.param_shapes(spec)
    for path in _flatten(expected):
        want, got = _get(expected, path), tuple(_get(params, path).shape)
        if want != got:
            raise LoadError(f"{'/'.join(path)} has shape {got}, the config implies {want}")


def params_to_hf_tensors(params: dict[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Our pytree back to a flat {hf name: float32 array} dict."""
    tensors: dict[str, np.ndarray] = {}
    for path, name, transpose, per_layer in _leaf_entries(spec):
        value = np.asarray(_get(params, path), dtype=np.float32)
        items = (
            [(name.format(i=i), value[i]) for i in range(spec.num_layers)]
            if per_layer
            else [(name, value)]
        )
        for hf_name, array in items:
            tensors[hf_name] = np.ascontiguousarray(array.T if transpose else array)
    if spec.family == "gpt2":
        _fuse_gpt2_qkv(tensors, spec.num_layers)
    return tensors


def read_checkpoint_tensors(directory: str) -> dict[str, np.ndarray]:
    """Reads every tensor of a HF model directory (safetensors, sharded or not, or .bin)."""
    files = sorted(os.listdir(directory))
    safetensors_files = [f for f in files if f.endswith(".safetensors")]
    bin_files = [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
    if safetensors_files:
        return _read_safetensors([os.path.join(directory, f) for f in safetensors_files])
    if bin_files:
        return _read_torch_bin([os.path.join(directory, f) for f in bin_files])
    raise LoadError(f"{directory}: no *.safetensors or pytorch_model*.bin weight file")


def _read_safetensors(paths: list[str]) -> dict[str, np.ndarray]:
    import safetensors
    from safetensors import flax as st_flax

    tensors = {}
    for path in paths:
        try:
            # The flax framework reads bf16 too, which plain numpy cannot represent.
            loaded = st_flax.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoadError(f"{path}: unreadable safetensors file ({message})") from None
        tensors.update(
            {name: np.asarray(value, dtype=np.float32) for name, value in loaded.items()}
        )
    return tensors


def _read_torch_bin(paths: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise LoadError("reading .bin checkpoints needs PyTorch; install torch") from None
    tensors = {}
    for path in paths:
        try:
            # weights_only=True: never run arbitrary pickled code from a downloaded file.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a corrupt or unsafe file.
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoadError(f"{path}: unreadable PyTorch checkpoint ({message})") from None
        tensors.update({name: value.float().numpy() for name, value in state.items()})
    return tensors


def save_hf(
    directory: str,
    params: dict[str, Any],
    spec: ModelSpec,
    hf_config: dict[str, Any],
    tokenizer: Any = None,
) -> None:
    """Writes params as a Hugging Face model directory (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    config = dict(hf_config)
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"
    config["tie_word_embeddings"] = spec.tie_embeddings
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(
        params_to_hf_tensors(params, spec),
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

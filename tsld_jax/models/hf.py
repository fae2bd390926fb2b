"""Hugging Face checkpoints to and from our parameter pytree, through the family registry's
name tables (`families/<family>.py`): generic, no family is named here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from tsld_jax.models import decoder, families
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec


def _family(spec: ModelSpec) -> families.Family:
    return families.get(spec.family)


def fused_name(fused: families.Fused, module: str) -> str:
    """The name under which one part of a fused tensor is kept between split and join, e.g.
    "self_attn.qkv_proj[attn/q]" (readable in error messages)."""
    return f"{fused.name}[{module}]"


def _module_names(family: families.Family) -> dict[str, str]:
    """Our module -> its checkpoint name (relative), parts of fused tensors included."""
    names = dict(family.hf_modules)
    for fused in family.hf_fused:
        names.update({module: fused_name(fused, module) for module in fused.parts})
    return names


def part_sizes(spec: ModelSpec, fused: families.Fused) -> list[int]:
    """Each part's width along the fused axis: its linear's output features."""
    layers = decoder.param_shapes(spec)["layers"]
    return [_get(layers, (*module.split("/"), "kernel"))[-1] for module in fused.parts]


def _leaf_entries(spec: ModelSpec) -> Iterator[tuple[tuple[str, ...], str, bool, bool]]:
    """Yields (our path, their name with {i} for a layer, transpose?, per-layer?) per leaf."""
    family = _family(spec)
    modules = _module_names(family)
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
        name = modules[module] + "." + suffix
        name = family.hf_prefix + (family.hf_layer if in_layers else "") + name
        transpose = leaf == "kernel" and not (in_layers and family.hf_conv1d)
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


def _split_fused(tensors: dict[str, np.ndarray], spec: ModelSpec) -> None:
    family = _family(spec)
    for fused in family.hf_fused:
        sizes = part_sizes(spec, fused)
        bounds = np.cumsum(sizes)[:-1]
        for i in range(spec.num_layers):
            base = family.hf_prefix + family.hf_layer.format(i=i)
            for suffix in ("weight", "bias"):
                name = f"{base}{fused.name}.{suffix}"
                stored = tensors.pop(name, None)
                if stored is None:
                    continue
                axis = fused.axis if stored.ndim > 1 else 0
                if stored.shape[axis] != sum(sizes):
                    raise LoadError(
                        f"tensor {name!r} has shape {tuple(stored.shape)}; its axis {axis} must "
                        f"hold {', '.join(fused.parts)} ({' + '.join(map(str, sizes))} rows)"
                    )
                for module, part in zip(
                    fused.parts, np.split(stored, bounds, axis=axis), strict=True
                ):
                    tensors[f"{base}{fused_name(fused, module)}.{suffix}"] = part


def _join_fused(tensors: dict[str, np.ndarray], spec: ModelSpec) -> None:
    family = _family(spec)
    for fused in family.hf_fused:
        for i in range(spec.num_layers):
            base = family.hf_prefix + family.hf_layer.format(i=i)
            for suffix in ("weight", "bias"):
                names = [f"{base}{fused_name(fused, module)}.{suffix}" for module in fused.parts]
                if names[0] not in tensors:
                    continue
                parts = [tensors.pop(name) for name in names]
                axis = fused.axis if parts[0].ndim > 1 else 0
                tensors[f"{base}{fused.name}.{suffix}"] = np.concatenate(parts, axis=axis)


def _normalise_names(tensors: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    # Base-model checkpoints (GPT2Model rather than GPT2LMHeadModel) omit the prefix.
    prefix = _family(spec).hf_prefix
    out = {}
    for name, value in tensors.items():
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        out[name] = value
    return out


def params_from_hf_tensors(tensors: dict[str, np.ndarray], spec: ModelSpec, dtype=np.float32):
    """Converts a flat {hf name: array} dict into our nested parameter pytree (numpy leaves)."""
    tensors = _normalise_names(tensors, spec)
    _split_fused(tensors, spec)
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
    _join_fused(tensors, spec)
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

"""Sharded loading: Hugging Face safetensors straight into their final shardings.

Each device's shard is read from the memory-mapped checkpoint by `jax.make_array_from_callback`
(safetensors' `get_slice` reads only the rows and columns asked for), so no device and no host
buffer ever holds the whole model: the host holds one shard of one parameter at a time (for a
stacked per-layer parameter, that shard across the layers), and each device receives only its
own shard. Fused tensors (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj) are sliced per
part instead of split in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import numpy as np

from tsld_jax.models import decoder, families, hf
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise LoadError(f"{directory}: sharded loading needs *.safetensors weight files")
    return [os.path.join(directory, f) for f in files]


def load_hf_sharded(directory: str, spec: ModelSpec, shardings: Any, dtype=np.float32) -> Any:
    """Our parameter pytree from a HF directory's safetensors, each leaf placed by `shardings`
    (a pytree like the params, e.g. `sharding.param_shardings`), shard by shard."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(p, "numpy")) for p in _weight_files(directory)]
        where = {name: h for h in handles for name in h.keys()}
        family = families.get(spec.family)
        prefix = family.hf_prefix
        # The parts of fused tensors (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj): our
        # module's name in hf.py -> (the stored module, axis, the part's offset and width).
        parts = {}
        for fused in family.hf_fused:
            sizes = hf.part_sizes(spec, fused)
            offsets = np.cumsum([0, *sizes])
            for module, offset, size in zip(fused.parts, offsets, sizes, strict=False):
                parts[hf.fused_name(fused, module)] = (fused.name, fused.axis, int(offset), size)

        def source(name: str):
            # (handle, stored name, (axis, offset) of a fused part or None) of a HF name.
            candidates = [name]
            if name.startswith(prefix):
                candidates.append(name[len(prefix) :])  # base-model checkpoints omit the prefix
            for candidate in candidates:
                if candidate in where:
                    return where[candidate], candidate, None
                for part, (stored_module, axis, offset, size) in parts.items():
                    if part in candidate:
                        stored = candidate.replace(part, stored_module)
                        if stored in where:
                            ndim = len(where[stored].get_slice(stored).get_shape())
                            return where[stored], stored, (axis if ndim > 1 else 0, offset, size)
            raise LoadError(f"checkpoint has no tensor {name!r}")

        def read(name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
            handle, stored, part = source(name)
            index = index[::-1] if transpose else index
            if part is not None:  # a fused tensor: shift the part's rows/columns by its offset
                axis, offset, size = part
                start, stop, _ = index[axis].indices(size)
                index = list(index)
                index[axis] = slice(offset + start, offset + stop)
                index = tuple(index)
            value = np.asarray(handle.get_slice(stored)[index], dtype=dtype)
            return value.T if transpose else value

        shapes = decoder.param_shapes(spec)
        params: dict[str, Any] = {}
        flat_shardings = {
            tuple(getattr(k, "key", k) for k in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
        }
        for path, name, transpose, per_layer in hf._leaf_entries(spec):
            shape = tuple(hf._get(shapes, path))

            def callback(index, name=name, transpose=transpose, per_layer=per_layer, shape=shape):
                index = tuple(i if isinstance(i, slice) else slice(i, i + 1) for i in index) + (
                    slice(None),
                ) * (len(shape) - len(index))
                if not per_layer:
                    return read(name, index, transpose)
                layers = range(*index[0].indices(shape[0]))
                return np.stack([read(name.format(i=i), index[1:], transpose) for i in layers])

            hf._set(
                params,
                path,
                jax.make_array_from_callback(shape, flat_shardings[path], callback),
            )
    return params

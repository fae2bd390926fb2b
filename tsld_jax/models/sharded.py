"""Sharded loading: Hugging Face safetensors straight into their final shardings.

Each device's shard is read from the memory-mapped checkpoint by `jax.make_array_from_callback`
(safetensors' `get_slice` reads only the rows and columns asked for), so no device and no host
buffer ever holds the whole model: the host holds one shard of one parameter at a time (for a
stacked per-layer parameter, that shard across the layers), and each device receives only its
own shard. GPT-2's fused c_attn is sliced per q/k/v column block instead of split in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import numpy as np

from tsld_jax.models import decoder, hf
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
        prefix = hf._TABLES[spec.family]["prefix"]

        def source(name: str):
            # (handle, stored name, column offset) of a HF name; GPT-2's q/k/v in c_attn.
            candidates = [name]
            if name.startswith(prefix):
                candidates.append(name[len(prefix) :])  # base-model checkpoints omit the prefix
            for candidate in candidates:
                if candidate in where:
                    return where[candidate], candidate, None
                part = candidate.rsplit(".", 2)
                if spec.family == "gpt2" and len(part) == 3 and part[1] in "qkv":
                    fused = f"{part[0]}.c_attn.{part[2]}"
                    if fused in where:
                        width = where[fused].get_slice(fused).get_shape()[-1] // 3
                        return where[fused], fused, "qkv".index(part[1]) * width
            raise LoadError(f"checkpoint has no tensor {name!r}")

        def read(name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
            handle, stored, offset = source(name)
            index = index[::-1] if transpose else index
            if offset is not None:  # GPT-2 Conv1D: the last axis holds q|k|v
                cols = index[-1]
                width = handle.get_slice(stored).get_shape()[-1] // 3
                start, stop, _ = cols.indices(width)
                index = (*index[:-1], slice(offset + start, offset + stop))
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

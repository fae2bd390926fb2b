"""Data-free distillation data (as in LLM-QAT): sequences sampled from the teacher once, cached.

The cache lives in WORKDIR/generated_<split>.npz, so a resumed run trains on the very same
sequences; sampling is seeded from the split. The cache stores the key of what produced it (a
fingerprint of the teacher's weights and architecture, the first token, count, length,
temperature, seed) and is sampled afresh when the key differs: another teacher, or the same
path holding new weights, never reuses old samples.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from tsld_jax import atomic, generate
from tsld_jax.data.sources import DataError


def sample(
    params,
    spec,
    count: int,
    length: int,
    temperature: float,
    seed: int,
    first_token: int,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """`count` sequences of `length` tokens sampled from the model, each starting `first_token`.

    Sampling runs through the KV-cache generator (`tsld_jax.generate`); no eos stops a row, so
    every sequence is exactly `length` tokens of model text. Decoding a few rows is bound by
    reading the weights, so large batches cost little more per step than small ones.
    """
    sampling = generate.Sampling(temperature=temperature)
    rng = jax.random.key(seed)
    out = []
    for start in tqdm(
        range(0, count, batch_size),
        desc="sampling teacher data",
        unit="batch",
        disable=not progress,
    ):
        n = min(batch_size, count - start)
        rng, key = jax.random.split(rng)
        prompts = np.full((n, 1), first_token, dtype=np.int32)
        new = generate.generate_tokens(
            params,
            spec,
            prompts,
            max_new_tokens=length - 1,
            sampling=sampling,
            rng=key,
            chunk_size=32,
        )
        out.append(np.concatenate([prompts, np.asarray(new, np.int32)], axis=1))
    return np.concatenate(out).astype(np.int32)


def teacher_fingerprint(params, spec) -> str:
    """A short hash of a model's architecture and weights, cheap even for a large model.

    It hashes every tensor's path, shape and dtype and up to 1024 evenly strided values of each
    (exact values, no reduction, so it is the same on every backend): any fine-tune or another
    checkpoint changes it, without reading every weight back from the device.
    """
    digest = hashlib.sha256(repr(spec).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat = leaf.reshape(-1)
        stride = max(1, flat.shape[0] // 1024)
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(jax.device_get(flat[::stride])).tobytes())
    return digest.hexdigest()[:16]


def _cache_key(teacher, first: int, count: int, length: int, temperature: float, seed: int):
    params, spec = teacher
    return {
        "teacher": teacher_fingerprint(params, spec),
        "first_token": int(first),
        "count": int(count),
        "length": int(length),
        "temperature": float(temperature),
        "seed": int(seed),
        "sampler": 1,  # Bump when the sampling code changes what it draws.
    }


def _read_cache(path: str, key: dict) -> np.ndarray | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as cached:
            stored = json.loads(str(cached["key"])) if "key" in cached else None
            tokens = cached["tokens"]
    except (OSError, ValueError, KeyError):
        stored, tokens = "unreadable", None
    if stored == key:
        return tokens
    changed = (
        ", ".join(f"{k} {stored.get(k)!r} -> {v!r}" for k, v in key.items() if stored.get(k) != v)
        if isinstance(stored, dict)
        else "made before caches were keyed"
        if stored is None
        else "unreadable"
    )
    print(f"note: {path} was made by other settings ({changed}); sampling afresh")
    return None


def load_or_sample(
    cfg, tokenizer, teacher, workdir, split: str, progress: bool = True
) -> np.ndarray:
    """The generated token blocks (N, T) of `split`, from the workdir cache or freshly sampled."""
    if teacher is None:
        raise DataError("generated data needs the teacher model")
    count = cfg.generated_sequences if split == "train" else max(cfg.eval_blocks, 1)
    first = getattr(tokenizer, "bos_token_id", None)
    if first is None:
        first = 0
    seed = 1000 + (0 if split == "train" else 1)
    key = _cache_key(teacher, first, count, cfg.block_size, cfg.generated_temperature, seed)
    path = os.path.join(workdir, f"generated_{split}.npz") if workdir else None
    if path:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    params, spec = teacher
    tokens = sample(
        params,
        spec,
        count,
        cfg.block_size,
        cfg.generated_temperature,
        seed,
        first,
        progress=progress,
    )
    if path:
        # Through a file object: np.savez given a name appends ".npz" to the temporary's.
        with atomic.replacing(path) as temporary, open(temporary, "wb") as f:
            np.savez(f, tokens=tokens, key=json.dumps(key, sort_keys=True))
    return tokens

"""Data-free distillation data (as in LLM-QAT): sequences sampled from the teacher once, cached.

The cache lives in WORKDIR/generated_<split>.npz, so a resumed run trains on the very same
sequences; sampling is seeded from the config seed and the split.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tsld_jax.models import decoder


@functools.partial(jax.jit, static_argnames=("spec",))
def _next_token_logits(params, tokens_BxT, index, spec):
    # Full recomputation over a fixed (B, T) buffer: causal attention makes the not-yet-written
    # positions irrelevant, and the shape never changes (one compilation).
    logits = decoder.forward(params, tokens_BxT, spec)
    return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)


def sample(
    params,
    spec,
    count: int,
    length: int,
    temperature: float,
    seed: int,
    first_token: int,
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """`count` sequences of `length` tokens sampled from the model, each starting `first_token`."""
    generate = _kv_cache_sampler()
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
        if generate is not None:
            out.append(generate(params, spec, n, length, temperature, key, first_token))
            continue
        tokens = jnp.full((n, length), first_token, dtype=jnp.int32)
        for index in range(length - 1):
            key, step_key = jax.random.split(key)
            logits = _next_token_logits(params, tokens, index, spec).astype(jnp.float32)
            if temperature > 0:
                token = jax.random.categorical(step_key, logits / temperature, axis=-1)
            else:
                token = jnp.argmax(logits, axis=-1)
            tokens = tokens.at[:, index + 1].set(token.astype(jnp.int32))
        out.append(np.asarray(tokens))
    return np.concatenate(out).astype(np.int32)


def _kv_cache_sampler():
    """The KV-cache sampler of `tsld_jax.generate`, when that module provides one."""
    try:
        from tsld_jax import generate
    except ImportError:
        return None
    return getattr(generate, "sample_sequences", None)


def load_or_sample(cfg, tokenizer, teacher, workdir, split: str):
    """The generated examples of `split`, from the workdir cache or freshly sampled."""
    from tsld_jax import data

    if teacher is None:
        raise data.DataError("generated data needs the teacher model")
    count = cfg.generated_sequences if split == "train" else max(cfg.eval_blocks, 1)
    path = os.path.join(workdir, f"generated_{split}.npz") if workdir else None
    if path and os.path.exists(path):
        cached = np.load(path)["tokens"]
        if cached.shape == (count, cfg.block_size):
            return data.lm_examples(cached)
    params, spec = teacher
    first = getattr(tokenizer, "bos_token_id", None)
    if first is None:
        first = 0
    seed = 1000 + (0 if split == "train" else 1)
    tokens = sample(params, spec, count, cfg.block_size, cfg.generated_temperature, seed, first)
    if path:
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=tokens)
        os.replace(tmp, path)
    return data.lm_examples(tokens)

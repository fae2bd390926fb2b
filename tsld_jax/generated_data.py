"""Data-free distillation data (as in LLM-QAT): sequences sampled from the teacher once, cached.

The cache lives in WORKDIR/generated_<split>.npz, so a resumed run trains on the very same
sequences; sampling is seeded from the config seed and the split.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from tqdm.auto import tqdm

from tsld_jax import generate
from tsld_jax.evaluation.sources import DataError


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


def load_or_sample(
    cfg, tokenizer, teacher, workdir, split: str, progress: bool = True
) -> np.ndarray:
    """The generated token blocks (N, T) of `split`, from the workdir cache or freshly sampled."""
    if teacher is None:
        raise DataError("generated data needs the teacher model")
    count = cfg.generated_sequences if split == "train" else max(cfg.eval_blocks, 1)
    path = os.path.join(workdir, f"generated_{split}.npz") if workdir else None
    if path and os.path.exists(path):
        cached = np.load(path)["tokens"]
        if cached.shape == (count, cfg.block_size):
            return cached
    params, spec = teacher
    first = getattr(tokenizer, "bos_token_id", None)
    if first is None:
        first = 0
    seed = 1000 + (0 if split == "train" else 1)
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
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=tokens)
        os.replace(tmp, path)
    return tokens

"""Perplexity with the authors' protocol (PTB, WikiText-2).

The lines are read and cut into blocks by `tsld_jax.data.text`, which training shares (each
line tokenized on its own, all concatenated and cut into blocks of 512 by default; `bos` as
there); ppl = exp(mean over blocks of each block's mean next-token loss).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tsld_jax.data.sources import DataError
from tsld_jax.data.text import BOS_MODES, load_lines, tokenize_blocks
from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec

__all__ = [
    "BOS_MODES",
    "DataError",
    "block_losses",
    "evaluate_blocks",
    "load_lines",
    "perplexity",
    "run",
    "tokenize_blocks",
]


def block_losses(
    params: dict[str, Any],
    blocks_BxT: jax.Array,
    spec: ModelSpec,
    quantizer=None,
    loss_mask_BxT: jax.Array | None = None,
    attention_mask_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Each block's mean next-token cross-entropy, (B,), in float32.

    With `loss_mask_BxT`, the mean runs over the positions whose mask is 1 (the prediction of
    token t from tokens < t counts where loss_mask[t] is 1); by default over all T - 1. With
    `segment_ids_BxT` (`data.document_attention`), attention stays within each document.
    """
    hidden_BxTxD, _ = decoder.hidden_states(
        params,
        blocks_BxT,
        spec,
        mask_BxT=attention_mask_BxT,
        quantizer=quantizer,
        segment_ids_BxT=segment_ids_BxT,
    )
    # The head only where a next token exists, and logsumexp - target logit rather than a full
    # log_softmax: neither the (B, T, V) slice nor the normalised copy is ever written.
    logits_BxTxV = decoder.unembed(params, hidden_BxTxD[:, :-1], spec).astype(jnp.float32)
    target_BxT = blocks_BxT[:, 1:]
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, target_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_logit_BxT
    if loss_mask_BxT is None:
        return nll_BxT.mean(axis=-1)
    weights_BxT = loss_mask_BxT[:, 1:].astype(jnp.float32)
    return (nll_BxT * weights_BxT).sum(-1) / jnp.maximum(weights_BxT.sum(-1), 1.0)


@functools.partial(jax.jit, static_argnames=("spec", "quantizer"))
def _jitted_block_losses(
    params, blocks_BxT, spec, quantizer, loss_mask_BxT, attention_mask_BxT, segment_ids_BxT=None
):
    return block_losses(
        params, blocks_BxT, spec, quantizer, loss_mask_BxT, attention_mask_BxT, segment_ids_BxT
    )


def evaluate_blocks(
    params: dict[str, Any],
    spec: ModelSpec,
    blocks_NxT: np.ndarray,
    *,
    batch_size: int = 4,
    quantizer=None,
    loss_mask: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Per-block mean losses for all blocks, batched with one compiled shape (last batch padded).

    Dense blocks (both masks None or all ones) follow the authors' protocol exactly; masked
    sequences (GSM8K-style) average over their counted positions. `segment_ids` (N, T): the
    document of each token, attention kept within each (`data.document_attention`).
    """
    if loss_mask is not None and attention_mask is not None:
        if loss_mask.all() and attention_mask.all():
            loss_mask = attention_mask = None
    losses = []
    for start in tqdm(
        range(0, len(blocks_NxT), batch_size), desc="perplexity", unit="batch", disable=not progress
    ):
        rows = slice(start, start + batch_size)
        arrays = [blocks_NxT[rows]] + [
            m[rows] if m is not None else None for m in (loss_mask, attention_mask, segment_ids)
        ]
        real = len(arrays[0])
        if real < batch_size:  # Pad with copies so the compiled shape never changes.
            arrays = [
                None if a is None else np.concatenate([a, np.repeat(a[:1], batch_size - real, 0)])
                for a in arrays
            ]
        batch, batch_loss_mask, batch_attention_mask, batch_segments = (
            None if a is None else jnp.asarray(a) for a in arrays
        )
        out = _jitted_block_losses(
            params, batch, spec, quantizer, batch_loss_mask, batch_attention_mask, batch_segments
        )
        losses.append(np.asarray(out)[:real])
    return np.concatenate(losses)


def perplexity(block_losses_N: np.ndarray) -> float:
    """exp of the mean over blocks of each block's mean loss (the authors' protocol)."""
    return float(math.exp(float(np.mean(block_losses_N, dtype=np.float64))))


def run(
    params: dict[str, Any],
    spec: ModelSpec,
    tokenizer: Any,
    *,
    task: str,
    split: str = "validation",
    data_dir: str | None = None,
    block_size: int = 512,
    max_blocks: int | None = None,
    batch_size: int = 4,
    quantizer=None,
    progress: bool = True,
    bos: str = "line",
) -> dict[str, Any]:
    """Loads, tokenizes and scores one split (`bos`: see `tokenize_blocks`); returns the
    results dictionary."""
    if block_size < 2:
        raise DataError(f"--block-size must be at least 2, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"--max-blocks must be at least 1, got {max_blocks}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    blocks = tokenize_blocks(load_lines(task, split, data_dir), tokenizer, block_size, bos)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    losses = evaluate_blocks(
        params, spec, blocks, batch_size=batch_size, quantizer=quantizer, progress=progress
    )
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in {int(np.sum(~np.isfinite(losses)))} blocks")
    return {
        "task": task,
        "split": split,
        "ppl": perplexity(losses),
        "loss": float(np.mean(losses, dtype=np.float64)),
        "tokens": int(blocks.size),
        "blocks": int(len(blocks)),
        "block_size": block_size,
        "bos": bos,
    }

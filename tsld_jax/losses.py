"""Distillation losses for QAT (PAPER.md, "Losses"): gt, logit, logit_gt, l2l and tsld.

All losses are pure, mask-aware functions. Inputs are already aligned: the logits at position t are
scored against the label at position t (callers shift). `mask` is 1 (or True) where a position
counts; masked positions take part in no sum, mean or softmax. Logits may be bfloat16; every loss
computes in float32. The teacher is a constant: its logits pass through `stop_gradient`.

The per-token pass. Every loss that reads the teacher's logits reduces them through one function
of a single token, `token_losses(student logits, teacher logits, label)`, which returns the
token's soft cross-entropy to the teacher and the student's and the teacher's cross-entropy with
the label; it is mapped with `jax.vmap` over the tokens (B, C) of each chunk, and the whole pass
is jitted.

Memory. A naive TSLD keeps several float32 (B, T, V) arrays alive for the backward pass (both
softmaxes and log-softmaxes). With `chunk_size` set, the vmapped per-token function runs over
chunks of positions (the whole batch at once, about `chunk_size` tokens per chunk) inside a
`fori_loop`, under a `custom_vjp` whose backward, again one per-token function vmapped over a
chunk, recomputes the softmaxes from three saved scalars a token, so the loss's own working
memory grows with chunk_size x V instead of B x T x V. TSLD then costs the same as logit
distillation: the teacher's cross-entropy (the token scales' input) is a by-product of the same
pass. Chunks cut the token axis and keep the batch whole, so that under a batch-sharded mesh every
device slices only its own data; the loop writes each chunk's results in place into (B, T)
buffers (and the gradient into one (B, T, V) buffer), so no stacked per-chunk copy is made.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Shaped

KINDS = ("gt", "logit", "logit_gt", "l2l", "tsld")
DEFAULT_CHUNK_SIZE = 256
DEFAULT_TEMPERATURE = 10.0  # tau of PAPER.md's token-scale softmax

Logits = Shaped[Array, "B T V"]
Labels = Int[Array, "B T"]
Mask = Shaped[Array, "B T"] | None
Scalar = Float[Array, ""]


# ----------------------------------------------------------------------------- per-token pass
class TokenLosses(NamedTuple):
    """What every loss needs from one token's logits (each a float32 scalar per token)."""

    soft_ce: Float[Array, "*tokens"]  # CE_t = -sum_v p_t[v] log q[v], to the teacher
    student_ce: Float[Array, "*tokens"]  # the student's cross-entropy with the label (`gt`)
    teacher_ce: Float[Array, "*tokens"]  # c_t, the teacher's, input of TSLD's token scales


class _Residuals(NamedTuple):
    # What the hand-written backward keeps of the forward: three scalars a token, no V-vector.
    student_lse: Float[Array, "*tokens"]
    teacher_lse: Float[Array, "*tokens"]
    sum_p: Float[Array, "*tokens"]  # sum_v p_t[v]: 1 up to rounding, kept so the gradient is exact


def _token_forward(
    student_V: Float[Array, " V"], teacher_V: Float[Array, " V"], label: Int[Array, ""]
) -> tuple[TokenLosses, _Residuals]:
    student_V = student_V.astype(jnp.float32)
    teacher_V = teacher_V.astype(jnp.float32)
    student_lse = jax.nn.logsumexp(student_V)
    teacher_lse = jax.nn.logsumexp(teacher_V)
    p_teacher_V = jnp.exp(teacher_V - teacher_lse)
    # CE_t = -sum_v p_t[v] * log q[v]  (PAPER.md, `logit`).
    soft_ce = -jnp.sum(p_teacher_V * (student_V - student_lse))
    # c_t = CE(z_t[t], y_t) (PAPER.md, `tsld` step 1) and the student's own `gt` term. A label
    # outside the vocabulary reads NaN (loud), where plain indexing would clamp it silently.
    student_label = student_V.at[label].get(mode="fill", fill_value=jnp.nan)
    teacher_label = teacher_V.at[label].get(mode="fill", fill_value=jnp.nan)
    stats = TokenLosses(soft_ce, student_lse - student_label, teacher_lse - teacher_label)
    return stats, _Residuals(student_lse, teacher_lse, jnp.sum(p_teacher_V))


def token_losses(
    student_logits: Float[Array, " V"], teacher_logits: Float[Array, " V"], label: Int[Array, ""]
) -> TokenLosses:
    """The per-token pass: one token's (student logits, teacher logits, label) to its losses.

    Every loss of this module but `gt` reduces the (B, T, V) logits through this function alone,
    mapped with `jax.vmap` over the tokens of each chunk; it is public so that it can be read,
    tested and reused on its own.

    Args:
      student_logits: (V,) the student's logits at one position, any float dtype.
      teacher_logits: (V,) the teacher's logits at the same position.
      label: the int next token y_t.

    Returns:
      TokenLosses(soft_ce, student_ce, teacher_ce), float32 scalars: the soft cross-entropy to
      the teacher CE_t, the student's cross-entropy with the label, and the teacher's c_t.
    """
    return _token_forward(student_logits, teacher_logits, label)[0]


def _token_backward(
    student_V: Float[Array, " V"],
    teacher_V: Float[Array, " V"],
    label: Int[Array, ""],
    residuals: _Residuals,
    soft_ce_grad: Float[Array, ""],
    student_ce_grad: Float[Array, ""],
) -> Float[Array, " V"]:
    # Written by hand, rather than autodiff of `_token_forward` under the chunk loop, so that it
    # needs only the three saved scalars: d soft_ce / d z_s = q * sum(p) - p and
    # d student_ce / d z_s = q - onehot(y); the teacher's CE takes no gradient.
    q_student_V = jnp.exp(student_V.astype(jnp.float32) - residuals.student_lse)
    p_teacher_V = jnp.exp(teacher_V.astype(jnp.float32) - residuals.teacher_lse)
    one_hot_V = (jnp.arange(student_V.shape[-1]) == label).astype(jnp.float32)
    grad_V = soft_ce_grad * (q_student_V * residuals.sum_p - p_teacher_V)
    grad_V = grad_V + student_ce_grad * (q_student_V - one_hot_V)
    return grad_V.astype(student_V.dtype)


def _over_tokens(token_fn):
    """Maps a per-token function over the (B, C) tokens of a chunk (or of the whole batch)."""
    return jax.vmap(jax.vmap(token_fn))


def _positions_per_chunk(batch: int, length: int, chunk_size: int) -> int:
    # Chunks cut the token axis T and keep the batch whole (a batch-sharded mesh then slices
    # only unsharded data), so a chunk holds batch x positions ~ chunk_size tokens.
    return max(1, min(length, chunk_size // batch))


def _chunk_loop(length, positions, body, init):
    def step(i, carry):
        # The last chunk is shifted back to end at the last position; it recomputes a few
        # positions of the previous chunk and writes identical values, which avoids padding the
        # logits (a full-size copy).
        return body(jnp.minimum(i * positions, length - positions), carry)

    return lax.fori_loop(0, -(-length // positions), step, init)


def _cutter(positions):
    return lambda x, start: lax.dynamic_slice_in_dim(x, start, positions, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_token_losses(student_BxTxV, teacher_BxTxV, labels_BxT, chunk_size) -> TokenLosses:
    return _chunked_token_losses_fwd(student_BxTxV, teacher_BxTxV, labels_BxT, chunk_size)[0]


def _chunked_token_losses_fwd(student_BxTxV, teacher_BxTxV, labels_BxT, chunk_size):
    batch, length, _ = student_BxTxV.shape
    positions = _positions_per_chunk(batch, length, chunk_size)
    cut = _cutter(positions)

    def body(start, outputs_BxT):
        stats_BxC, residuals_BxC = _over_tokens(_token_forward)(
            cut(student_BxTxV, start), cut(teacher_BxTxV, start), cut(labels_BxT, start)
        )
        return tuple(
            lax.dynamic_update_slice_in_dim(buffer, value, start, axis=1)
            for buffer, value in zip(outputs_BxT, (*stats_BxC, *residuals_BxC), strict=True)
        )

    zeros_BxT = tuple(jnp.zeros_like(labels_BxT, jnp.float32) for _ in range(6))  # keeps sharding
    outputs_BxT = _chunk_loop(length, positions, body, zeros_BxT)
    residuals_BxT = _Residuals(*outputs_BxT[3:])
    return TokenLosses(*outputs_BxT[:3]), (student_BxTxV, teacher_BxTxV, labels_BxT, residuals_BxT)


def _chunked_token_losses_bwd(chunk_size, saved, cotangents: TokenLosses):
    student_BxTxV, teacher_BxTxV, labels_BxT, residuals_BxT = saved
    batch, length, _ = student_BxTxV.shape
    positions = _positions_per_chunk(batch, length, chunk_size)
    cut = _cutter(positions)

    def body(start, grad_BxTxV):
        grad_BxCxV = _over_tokens(_token_backward)(
            cut(student_BxTxV, start),
            cut(teacher_BxTxV, start),
            cut(labels_BxT, start),
            _Residuals(*(cut(r, start) for r in residuals_BxT)),
            cut(cotangents.soft_ce, start),
            cut(cotangents.student_ce, start),
        )
        return lax.dynamic_update_slice_in_dim(grad_BxTxV, grad_BxCxV, start, axis=1)

    grad_BxTxV = _chunk_loop(length, positions, body, jnp.zeros_like(student_BxTxV))
    return grad_BxTxV, None, None


_chunked_token_losses.defvjp(_chunked_token_losses_fwd, _chunked_token_losses_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _token_stats(
    student_BxTxV: jax.Array,
    teacher_BxTxV: jax.Array,
    labels_BxT: jax.Array,
    chunk_size: int | None,
) -> TokenLosses:
    """`token_losses` of every token, each field (B, T) float32.

    Only soft_ce and student_ce carry gradients (to the student's logits); the teacher is a
    constant. `chunk_size=None` is the naive pass: the same vmapped per-token function over the
    whole (B, T, V) arrays, with plain autodiff.
    """
    if teacher_BxTxV.shape != student_BxTxV.shape:
        raise ValueError(
            f"student logits {student_BxTxV.shape} and teacher logits {teacher_BxTxV.shape} differ"
        )
    if labels_BxT.shape != student_BxTxV.shape[:2]:
        raise ValueError(f"labels {labels_BxT.shape} do not match logits {student_BxTxV.shape}")
    teacher_BxTxV = lax.stop_gradient(teacher_BxTxV)
    labels_BxT = labels_BxT.astype(jnp.int32)
    if chunk_size is None:
        stats = _over_tokens(token_losses)(student_BxTxV, teacher_BxTxV, labels_BxT)
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        stats = _chunked_token_losses(student_BxTxV, teacher_BxTxV, labels_BxT, int(chunk_size))
    return stats._replace(teacher_ce=lax.stop_gradient(stats.teacher_ce))


# ----------------------------------------------------------------------------- reductions
def _valid(mask_BxT: Mask, shape: tuple[int, ...]) -> jax.Array:
    if mask_BxT is None:
        return jnp.ones(shape, bool)
    if mask_BxT.shape != shape:
        raise ValueError(f"mask {mask_BxT.shape} does not match the token shape {shape}")
    return mask_BxT > 0


def _masked_mean(values_BxT: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.where(valid_BxT, values_BxT, 0.0))
    return total / jnp.maximum(jnp.sum(valid_BxT.astype(jnp.float32)), 1.0)


def token_scales(
    teacher_ce: Float[Array, "B T"], mask: Mask = None, temperature: float = DEFAULT_TEMPERATURE
) -> Float[Array, "B T"]:
    """TSLD's token scales: a softmax over the positions of each sequence of c_t / tau.

    Args:
      teacher_ce: the teacher's per-token cross-entropy with the ground truth, c_t.
      mask: 1 where a position counts; masked positions get scale 0 and do not enter the softmax.
      temperature: tau (10 in the paper).

    Returns:
      Scales that sum to 1 over the valid positions of each sequence (0 for an all-masked one),
      without gradient.
    """
    valid_BxT = _valid(mask, teacher_ce.shape)
    x_BxT = jnp.where(valid_BxT, lax.stop_gradient(teacher_ce).astype(jnp.float32) / temperature, 0)
    top_B = jnp.max(jnp.where(valid_BxT, x_BxT, -jnp.inf), axis=-1, keepdims=True)
    top_B = jnp.where(jnp.isfinite(top_B), top_B, 0.0)
    e_BxT = jnp.where(valid_BxT, jnp.exp(x_BxT - top_B), 0.0)
    return lax.stop_gradient(e_BxT / jnp.maximum(jnp.sum(e_BxT, axis=-1, keepdims=True), 1e-30))


def _tsld_term(soft_ce_BxT, teacher_ce_BxT, valid_BxT, temperature):
    # PAPER.md: L_tsld = sum over sequences and positions of s_t * CE_t (sequences summed).
    scales_BxT = token_scales(teacher_ce_BxT, valid_BxT, temperature)
    return jnp.sum(jnp.where(valid_BxT, scales_BxT * soft_ce_BxT, 0.0))


# ----------------------------------------------------------------------------- public losses
def gt(student_logits: Logits, labels: Labels, mask: Mask = None) -> Scalar:
    """Next-token cross-entropy of the student, mean over the valid tokens.

    Args:
      student_logits: (B, T, V) logits, any float dtype.
      labels: (B, T) int targets aligned with the logits.
      mask: optional (B, T), 1 where a token counts.

    Returns:
      A float32 scalar.
    """
    logits_BxTxV = student_logits.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    label_BxT = jnp.take_along_axis(logits_BxTxV, labels[..., None].astype(jnp.int32), -1)[..., 0]
    return _masked_mean(lse_BxT - label_BxT, _valid(mask, labels.shape))


def logit(
    student_logits: Logits,
    teacher_logits: Logits,
    mask: Mask = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Scalar:
    """Logit distillation: soft cross-entropy to the teacher, mean over the valid tokens.

    Args:
      student_logits: (B, T, V) student logits.
      teacher_logits: (B, T, V) teacher logits (no gradient flows into them).
      mask: optional (B, T), 1 where a token counts.
      chunk_size: tokens per chunk of the memory-lean pass (B x max(1, chunk_size // B)
        positions); None for the naive one.

    Returns:
      A float32 scalar, mean_t of -sum_v p_t[v] log q[v].
    """
    labels_BxT = jnp.zeros(student_logits.shape[:2], jnp.int32)
    soft_ce, _, _ = _token_stats(student_logits, teacher_logits, labels_BxT, chunk_size)
    return _masked_mean(soft_ce, _valid(mask, labels_BxT.shape))


def logit_gt(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Labels,
    mask: Mask = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Scalar:
    """`logit + gt`, from one fused pass over the logits (arguments as in `logit` and `gt`)."""
    soft_ce, student_ce, _ = _token_stats(student_logits, teacher_logits, labels, chunk_size)
    valid_BxT = _valid(mask, labels.shape)
    return _masked_mean(soft_ce, valid_BxT) + _masked_mean(student_ce, valid_BxT)


def tsld(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: Labels,
    mask: Mask = None,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Scalar:
    """The token-scaled logit distillation term L_tsld (without the `gt` the authors add to it).

    c_t = CE(teacher[t], y_t); s_t = softmax_t(c_t / tau) over the valid positions of each
    sequence, without gradient; L_tsld = sum over sequences and positions of s_t * CE_t, where
    CE_t is the soft cross-entropy of `logit`. `distillation_loss("tsld", ...)` returns
    `gt + L_tsld`, as the authors ran it.

    Args:
      student_logits: (B, T, V) student logits.
      teacher_logits: (B, T, V) teacher logits (no gradient flows into them).
      labels: (B, T) int targets (for the teacher's cross-entropy only).
      mask: optional (B, T), 1 where a token counts (also in the scale softmax).
      temperature: tau of the token-scale softmax (10 in the paper).
      chunk_size: tokens per chunk of the memory-lean pass (B x max(1, chunk_size // B)
        positions); None for the naive one.

    Returns:
      A float32 scalar (summed over sequences, not averaged).
    """
    soft_ce, _, teacher_ce = _token_stats(student_logits, teacher_logits, labels, chunk_size)
    return _tsld_term(soft_ce, teacher_ce, _valid(mask, labels.shape), temperature)


def hidden_mse(
    student_hidden: Sequence[Float[Array, "B T D"]],
    teacher_hidden: Sequence[Float[Array, "B T D"]],
    mask: Mask = None,
) -> Scalar:
    """l2l's hidden-state term: over the entries of the two sequences, the sum of each entry's
    mean squared difference over its valid tokens and features.

    The authors' trainer (aiha-lab/TSLD, `KDTrainer.compute_loss`) adds up `MSELoss` over every
    entry of Hugging Face's `hidden_states`; with no mask this is that sum. Entries may differ in
    width (OPT-350m's last one is after project_out); a masked token counts in no mean.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student and {len(teacher_hidden)} teacher states")
    total = jnp.zeros((), jnp.float32)
    for student_BxTxD, teacher_BxTxD in zip(student_hidden, teacher_hidden, strict=True):
        valid_BxT = _valid(mask, student_BxTxD.shape[:2])
        diff_BxTxD = student_BxTxD.astype(jnp.float32) - lax.stop_gradient(teacher_BxTxD).astype(
            jnp.float32
        )
        squares_BxT = jnp.sum(jnp.square(diff_BxTxD), axis=-1)
        count = jnp.maximum(jnp.sum(valid_BxT.astype(jnp.float32)), 1.0) * diff_BxTxD.shape[-1]
        total = total + jnp.sum(jnp.where(valid_BxT, squares_BxT, 0.0)) / count
    return total


def attention_mse(
    student_probs: Float[Array, "L B H T T"],
    teacher_probs: Float[Array, "L B H T T"],
    mask: Mask = None,
) -> Scalar:
    """l2l's attention term: over layers, the sum of each layer's mean squared difference of the
    post-softmax attention probabilities over the causal lower triangle (diagonal included).

    As the authors' trainer computes it on Hugging Face's `attentions` (its `<= -1e5` filter is
    a no-op on probabilities). With a mask, a (query t, key s) pair counts when s <= t and both
    positions are valid; without one, every pair of the triangle counts, as in theirs.
    """
    length = student_probs.shape[-1]
    valid_BxT = _valid(mask, (student_probs.shape[1], length))
    causal_TxS = jnp.tril(jnp.ones((length, length), bool))
    valid_BxTxS = causal_TxS[None] & valid_BxT[:, :, None] & valid_BxT[:, None, :]
    diff = student_probs.astype(jnp.float32) - lax.stop_gradient(teacher_probs).astype(jnp.float32)
    squares_LxBxHxTxS = jnp.where(valid_BxTxS[None, :, None], jnp.square(diff), 0.0)
    # Every layer has the same count, so the sum of the layers' means is one division.
    count = jnp.maximum(jnp.sum(valid_BxTxS.astype(jnp.float32)), 1.0) * student_probs.shape[2]
    return jnp.sum(squares_LxBxHxTxS) / count


def l2l(
    student_logits: Logits,
    teacher_logits: Logits,
    student_hidden: Sequence[Float[Array, "B T D"]],
    teacher_hidden: Sequence[Float[Array, "B T D"]],
    student_probs: Float[Array, "L B H T T"],
    teacher_probs: Float[Array, "L B H T T"],
    mask: Mask = None,
    aux_mask: Mask = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Scalar:
    """Layer-to-layer distillation as the authors ran it: `logit` + `hidden_mse` +
    `attention_mse`.

    Args:
      student_logits: (B, T', V) student logits, aligned with the labels (T' is T - 1 when the
        models read the whole block of T tokens, as `qat.qat_loss` runs them for l2l).
      teacher_logits: (B, T', V) teacher logits.
      student_hidden: the decoder's `collect=("hidden",)` tuple, L+1 arrays (B, T, D): as Hugging
        Face's `hidden_states`, the last one after the final norm.
      teacher_hidden: likewise for the teacher.
      student_probs: the decoder's `collect=("attn_probs",)`, (L, B, H, T, T), post-softmax.
      teacher_probs: likewise for the teacher.
      mask: optional (B, T'), 1 where a logit position counts.
      aux_mask: optional (B, T), 1 where a position of the hidden states and attention counts;
        by default `mask`.
      chunk_size: as in `logit`.

    Returns:
      A float32 scalar.
    """
    aux_mask = mask if aux_mask is None else aux_mask
    return (
        logit(student_logits, teacher_logits, mask, chunk_size)
        + hidden_mse(student_hidden, teacher_hidden, aux_mask)
        + attention_mse(student_probs, teacher_probs, aux_mask)
    )


def distillation_loss(
    kind: str,
    student_logits: Logits,
    teacher_logits: Logits | None,
    labels: Labels,
    mask: Mask = None,
    *,
    student_aux: Mapping[str, jax.Array] | None = None,
    teacher_aux: Mapping[str, jax.Array] | None = None,
    aux_mask: Mask = None,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Scalar, dict[str, Scalar]]:
    """The QAT objective by name, with its parts for logging.

    Args:
      kind: "gt", "logit", "logit_gt", "l2l" or "tsld" (= gt + L_tsld, as the authors ran it).
      student_logits: (B, T, V) student logits.
      teacher_logits: (B, T, V) teacher logits; may be None for "gt".
      labels: (B, T) int targets aligned with the logits.
      mask: optional (B, T), 1 where a token counts.
      student_aux: for "l2l", the student's `decoder.forward(collect=("hidden", "attn_probs"))`
        aux dict.
      teacher_aux: likewise for the teacher.
      aux_mask: for "l2l", (B, T) over the positions of the aux arrays (which may be one more
        than the logits'), 1 where one counts; by default `mask`.
      temperature: tau of TSLD's token-scale softmax.
      chunk_size: tokens per chunk of the memory-lean pass (B x max(1, chunk_size // B)
        positions); None for the naive one.

    Returns:
      (loss, parts): the float32 scalar to minimise and a dict of its named terms.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; expected one of {KINDS}")
    valid_BxT = _valid(mask, labels.shape)
    if kind == "gt":
        loss = gt(student_logits, labels, valid_BxT)
        return loss, {"gt": loss}
    if teacher_logits is None:
        raise ValueError(f"distillation loss {kind!r} needs teacher logits")
    soft_ce, student_ce, teacher_ce = _token_stats(
        student_logits, teacher_logits, labels, chunk_size
    )
    parts = {"gt": _masked_mean(student_ce, valid_BxT), "logit": _masked_mean(soft_ce, valid_BxT)}
    if kind == "logit":
        return parts["logit"], parts
    if kind == "logit_gt":
        return parts["logit"] + parts["gt"], parts
    if kind == "tsld":
        parts["tsld"] = _tsld_term(soft_ce, teacher_ce, valid_BxT, temperature)
        return parts["gt"] + parts["tsld"], parts
    if not student_aux or not teacher_aux:
        raise ValueError("distillation loss 'l2l' needs student_aux and teacher_aux")
    aux_valid_BxT = valid_BxT if aux_mask is None else aux_mask
    parts["hidden_mse"] = hidden_mse(student_aux["hidden"], teacher_aux["hidden"], aux_valid_BxT)
    parts["attn_mse"] = attention_mse(
        student_aux["attn_probs"], teacher_aux["attn_probs"], aux_valid_BxT
    )
    return parts["logit"] + parts["hidden_mse"] + parts["attn_mse"], parts

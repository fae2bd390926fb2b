"""How far a student's next-token distributions are from its teacher's, position by position.

The paper's analysis of why TSLD helps (PAPER.md): under causal attention a quantized model's
error at position t feeds every later position, so its divergence from the teacher may grow
along the sequence. `position_errors` measures that on held-out blocks: for each position of the
block, KL(teacher || student) in nats and the share of blocks whose top-1 tokens agree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec


def kl_and_agreement(
    teacher_logits_BxTxV: jax.Array, student_logits_BxTxV: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """KL(p_teacher || p_student) and top-1 agreement (1.0 or 0.0), each (B, T), in float32."""
    log_p_BxTxV = jax.nn.log_softmax(teacher_logits_BxTxV.astype(jnp.float32), axis=-1)
    log_q_BxTxV = jax.nn.log_softmax(student_logits_BxTxV.astype(jnp.float32), axis=-1)
    kl_BxT = jnp.sum(jnp.exp(log_p_BxTxV) * (log_p_BxTxV - log_q_BxTxV), axis=-1)
    agree_BxT = jnp.argmax(teacher_logits_BxTxV, -1) == jnp.argmax(student_logits_BxTxV, -1)
    return kl_BxT, agree_BxT.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("teacher_spec", "student_spec", "quantizer"))
def _batch_errors(
    teacher_params, student_params, blocks_BxT, teacher_spec, student_spec, quantizer
):
    teacher_BxTxV = decoder.forward(teacher_params, blocks_BxT, teacher_spec)
    student_BxTxV = decoder.forward(student_params, blocks_BxT, student_spec, quantizer=quantizer)
    return kl_and_agreement(teacher_BxTxV, student_BxTxV)


def position_errors(
    teacher_params: dict[str, Any],
    teacher_spec: ModelSpec,
    student_params: dict[str, Any],
    student_spec: ModelSpec,
    blocks_NxT: np.ndarray,
    *,
    batch_size: int = 4,
    quantizer=None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Mean over the blocks of KL and top-1 agreement at each position: dict(kl, agreement),
    each of shape (T,), position t being the prediction of token t + 1 from tokens <= t."""
    kl_sum_T = np.zeros(blocks_NxT.shape[1], np.float64)
    agree_sum_T = np.zeros(blocks_NxT.shape[1], np.float64)
    for start in tqdm(
        range(0, len(blocks_NxT), batch_size), desc="divergence", disable=not progress
    ):
        batch = blocks_NxT[start : start + batch_size]
        real = len(batch)
        if real < batch_size:  # One compiled shape: pad with copies, count only the real rows.
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, 0)])
        kl_BxT, agree_BxT = _batch_errors(
            teacher_params,
            student_params,
            jnp.asarray(batch),
            teacher_spec,
            student_spec,
            quantizer,
        )
        kl_sum_T += np.asarray(kl_BxT, np.float64)[:real].sum(0)
        agree_sum_T += np.asarray(agree_BxT, np.float64)[:real].sum(0)
    count = len(blocks_NxT)
    return {"kl": kl_sum_T / count, "agreement": agree_sum_T / count}

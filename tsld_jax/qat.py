"""The QAT objective as one pure function: quantized student, frozen teacher, distillation loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tsld_jax import losses
from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import rules as quant_rules

Params = dict[str, Any]


def qat_loss(
    student_params: Params,
    teacher_params: Params,
    batch: Mapping[str, jax.Array],
    spec: ModelSpec,
    rules: Any,
    kind: str = "tsld",
    *,
    temperature: float = losses.DEFAULT_TEMPERATURE,
    chunk_size: int | None = losses.DEFAULT_CHUNK_SIZE,
    remat: bool = False,
    pipeline: decoder.Pipeline | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The loss of one QAT step, differentiable with respect to the student only.

    The student runs with fake-quantized weights (straight-through gradients to its latent
    float weights, and to PACT+ scales); the teacher runs in full precision under
    `stop_gradient`, so it is never differentiated and needs no optimizer state.

    Args:
      student_params: the student's latent float parameters (with "quant_scale" leaves for PACT+).
      teacher_params: the full-precision teacher's parameters, same architecture.
      batch: "tokens" (B, T) int; optional "attention_mask" (B, T), 1 for real tokens, and
        "loss_mask" (B, T), 1 where the prediction *into* a position counts (the layout of
        `data/examples.py`); optional "segment_ids" (B, T), the document of each token
        (`data.document_attention`): student and teacher attend only within a document, with
        positions restarted in each, and the loss is unchanged (the first token of a document
        is still predicted from the EOS before it). Position t predicts token t + 1; the models
        read tokens 0..T-2 (all T for "l2l", whose hidden states and attention cover every
        position).
      spec: the architecture of both models.
      rules: quantization rules, a spec tree, or one QuantSpec (see `quant.make_quantizer`);
        None trains in full precision (the FP stage).
      kind: "gt", "logit", "logit_gt", "l2l" or "tsld" (gt + L_tsld).
      temperature: tau of TSLD's token-scale softmax.
      chunk_size: tokens per chunk of the memory-lean loss pass; None for the naive one.
      remat: recompute the student's blocks in the backward pass (see `decoder.forward`).
      pipeline: run both models' layers as a microbatched pipeline over the mesh's "stage"
        axis (see `decoder.forward`). The teacher runs pipelined too: its layers are sharded
        over the stages like the student's, so an unpipelined teacher would gather every one of
        its layers onto every stage's devices, the memory the stage axis exists to save.

    Returns:
      (loss, parts) as `losses.distillation_loss` returns them.
    """
    tokens_BxT = batch["tokens"]
    ones_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    attention_BxT = batch.get("attention_mask", ones_BxT)
    mask_BxT = batch.get("loss_mask", ones_BxT)[:, 1:] * attention_BxT[:, 1:]
    # Forwarding tokens 0..T-2 (instead of slicing the logits) avoids a copy of (B, T, V).
    segments_BxT = batch.get("segment_ids")
    inputs_BxT, input_mask_BxT, labels_BxT = (
        tokens_BxT[:, :-1],
        attention_BxT[:, :-1],
        tokens_BxT[:, 1:],
    )
    input_segments_BxT = None if segments_BxT is None else segments_BxT[:, :-1]
    collect = ("hidden", "attn_probs") if kind == "l2l" else ()
    if collect:
        # l2l matches every position's hidden states and attention as the authors' trainer
        # does (it runs the model on the whole block), so the models read all T tokens here;
        # the logits of positions 0..T-2 come from the last collected hidden state. Under jit
        # the forward's own (B, T, V) logits, unused, are never computed.
        inputs_BxT, input_mask_BxT = tokens_BxT, attention_BxT
        input_segments_BxT = segments_BxT

    def run(params, quantizer, remat=False):
        out = decoder.forward(
            params,
            inputs_BxT,
            spec,
            mask_BxT=input_mask_BxT,
            segment_ids_BxT=input_segments_BxT,
            quantizer=quantizer,
            collect=collect,
            remat=remat,
            pipeline=pipeline,
        )
        if not collect:
            return out, None
        _, aux = out
        return decoder.head(params, aux["hidden"][-1][:, :-1], spec), aux

    quantizer = None if rules is None else quant_rules.make_quantizer(rules)
    student_logits, student_aux = run(student_params, quantizer, remat)
    teacher_logits = teacher_aux = None
    if kind != "gt":
        teacher_logits, teacher_aux = jax.lax.stop_gradient(
            run(jax.lax.stop_gradient(teacher_params), None)
        )
    return losses.distillation_loss(
        kind,
        student_logits,
        teacher_logits,
        labels_BxT,
        mask_BxT,
        student_aux=student_aux,
        teacher_aux=teacher_aux,
        aux_mask=attention_BxT,
        temperature=temperature,
        chunk_size=chunk_size,
    )

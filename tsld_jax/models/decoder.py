"""The single decoder: pure functions over a nested-dict parameter pytree.

Parameter layout (every kernel in Flax layout, (in_features, out_features)):

    embed/tokens                 (V, E)
    positions                    (P, D)          learned-position families only
    project_in/kernel            (E, D)          OPT-350m only
    layers/...                   leading axis L, scanned with `lax.scan`
        attn_norm/{scale,bias}   (L, D)
        attn/{q,k,v,o}/{kernel,bias}
        attn/{q_norm,k_norm}/scale (L, K)        spec.qk_norm only
        post_attn_norm/scale     (L, D)          spec.post_norms only
        mlp_norm/{scale,bias}    (L, D)
        mlp/{up,gate,down}/{kernel,bias}
        post_mlp_norm/scale      (L, D)          spec.post_norms only
    final_norm/{scale,bias}      (D,)
    project_out/kernel           (D, E)          OPT-350m only
    lm_head/kernel               (E, V)          untied heads only

Every linear layer of a block goes through `linear()` (or `linears()`, which joins layers that
read the same input into one matmul); both fetch the kernel in one place, where quantization
hooks in: a `quantizer(name, layer_params) -> kernel` callable (names like "attn/q",
"mlp/down") returns the kernel the forward pass uses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tsld_jax.models import attention as attention_lib
from tsld_jax.models import pipeline as pipeline_lib
from tsld_jax.models.spec import ModelSpec

Params = dict[str, Any]
Pipeline = pipeline_lib.Pipeline
Quantizer = Callable[[str, Params], jax.Array]

LINEAR_NAMES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/gate", "mlp/down")


def _trailing(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a vector so it broadcasts over the last axis of an ndim array (explicitly, since
    the tests run with rank promotion disabled)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


# Joining kernels (`linears`) copies them once per call: worth it when many rows share that copy
# (training, scoring, prefill), not when decoding a token or a few, where reading the weights is
# the whole cost.
FUSE_MIN_ROWS = 64


def _kernel(layer_params: Params, name: str, quantizer: Quantizer | None) -> jax.Array:
    return layer_params["kernel"] if quantizer is None else quantizer(name, layer_params)


def _add_bias(layer_params: Params, y: jax.Array) -> jax.Array:
    if "bias" in layer_params:
        y = y + _trailing(layer_params["bias"].astype(y.dtype), y.ndim)
    return y


def linear(
    layer_params: Params,
    x: jax.Array,
    name: str,
    quantizer: Quantizer | None = None,
    packed_kernel: str = "auto",
) -> jax.Array:
    """y = x @ W + b, where W is the (possibly quantized) kernel of this linear layer.

    A packed model (`tsld_jax.quant.export`) holds a "packed" PackedWeight instead of "kernel";
    its product runs through `export.packed_matmul(..., kernel=packed_kernel)` ("auto": the
    Pallas kernel where the program is compiled for a GPU).
    """
    if "packed" in layer_params:
        from tsld_jax.quant import export  # lazy: the float model never imports Pallas

        y = export.packed_matmul(x, layer_params["packed"], packed_kernel)
    else:
        y = jnp.einsum("...i,io->...o", x, _kernel(layer_params, name, quantizer).astype(x.dtype))
    return _add_bias(layer_params, y)


def linears(
    layers_params: Sequence[Params],
    x: jax.Array,
    names: Sequence[str],
    quantizer: Quantizer | None = None,
    packed_kernel: str = "auto",
) -> list[jax.Array]:
    """`linear()` of several layers that read the same input (q/k/v; gate/up), as one matmul.

    Each kernel is quantized on its own (so per-tensor statistics stay per layer), then the
    kernels are joined along the output axis: one (in, sum of outs) matmul reads x once, and in
    the backward pass the input gradient is one matmul and the weight gradient transposes x
    once instead of once per layer (the step time it saved: docs/benchmarks.md). Below
    FUSE_MIN_ROWS rows, and for
    packed layers, each layer runs through `linear()` on its own.
    """
    pairs = list(zip(layers_params, names, strict=True))
    if math.prod(x.shape[:-1]) < FUSE_MIN_ROWS or any("packed" in p for p in layers_params):
        return [linear(p, x, name, quantizer, packed_kernel) for p, name in pairs]
    kernels = [_kernel(p, name, quantizer).astype(x.dtype) for p, name in pairs]
    # The rows are flattened before the matmul and each part is reshaped back only after the
    # split. Splitting the (B, T, sum of outs) product instead makes the backward pass
    # concatenate the parts' (B, T, out) gradients, and XLA:GPU fuses that concatenate, then the
    # (B, T) -> B*T reshape, into the weight-gradient GEMM, whose contraction then runs over
    # the merged B*T axis: when T is not a multiple of the K tile (the student reads T - 1 =
    # 511 tokens), no rectangular tile covers it and the Triton GEMM emitter fails ("Couldn't
    # find output tile sizes", for sm_80 and sm_90 alike; tests/aot_test.py). Concatenating 2D
    # (B*T, out) gradients leaves a plain contraction axis, which any row count tiles.
    rows = x.shape[:-1]
    y_RxO = x.reshape(-1, x.shape[-1]) @ jnp.concatenate(kernels, axis=-1)
    bounds = list(itertools.accumulate(k.shape[-1] for k in kernels))[:-1]
    parts = [part.reshape(*rows, -1) for part in jnp.split(y_RxO, bounds, axis=-1)]
    return [_add_bias(p, part) for p, part in zip(layers_params, parts, strict=True)]


def _norm(p: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if spec.norm == "rmsnorm":
        x32 = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + spec.norm_eps)
        if spec.norm_offset:
            # Gemma multiplies by (1 + w) in float32 before rounding to the model's dtype; LLaMA
            # rounds first and multiplies in that dtype.
            scale = spec.norm_offset + p["scale"].astype(jnp.float32)
            return (_trailing(scale, x.ndim) * x32).astype(x.dtype)
        return _trailing(p["scale"].astype(x.dtype), x.ndim) * x32.astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + spec.norm_eps)
    return (y * _trailing(p["scale"], y.ndim) + _trailing(p["bias"], y.ndim)).astype(x.dtype)


def _activation(x: jax.Array, name: str) -> jax.Array:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.silu(x)


def _rotary(x_BxTxNxK: jax.Array, positions_BxT: jax.Array, inv_freq_K2: jax.Array) -> jax.Array:
    # Hugging Face's "rotate_half" convention: the two halves of each head form the pairs. The
    # inverse frequencies are the layer's own (`ModelSpec.layer_inv_frequencies`).
    angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_K2[None, None]
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTxK), jnp.sin(angles_BxTxK)
    x32 = x_BxTxNxK.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_BxTxNxK.dtype)


# The mask, the tiled attention (its QUERY_TILE) and the soft-cap live in `attention.py` beside
# the fused kernels; these names stay for the decoder's callers.
attention_mask = attention_lib.attention_mask
_softcap = attention_lib.softcap


def _attention(
    p: Params,
    x_BxTxD: jax.Array,
    spec: ModelSpec,
    positions_BxT: jax.Array,
    inv_freq_K2: jax.Array,
    allowed: jax.Array,
    quantizer: Quantizer | None,
    cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    want_probs: bool = False,
    packed_kernel: str = "auto",
) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array] | None]:
    """Self-attention; with `cache` = (keys_LxBxNxSxK, values_LxBxNxSxK, layer, index) the new
    keys/values are written into layer `layer`'s slots from `index` on, and the queries attend
    over all S slots (`allowed` is then (B, 1, 1, T, S)); without one, `allowed` is an
    `attention.Mask` and the attention runs as `spec.attention` chooses. Returns (output, the
    post-softmax probabilities (B, H, T, S) if `want_probs` else None, the updated (keys, values)
    stacks or None).

    Keys and values are kept heads-first, (B, N, S, K), so that both einsums are plain batched
    matmuls over a cache that is never transposed (decoding reads all of it every step)."""
    batch, length, _ = x_BxTxD.shape
    kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
    groups = spec.num_heads // kv_heads
    q, k, v = linears(
        [p["q"], p["k"], p["v"]], x_BxTxD, ["attn/q", "attn/k", "attn/v"], quantizer, packed_kernel
    )
    q = q.reshape(batch, length, spec.num_heads, -1)
    k = k.reshape(batch, length, kv_heads, head_dim)
    v = v.reshape(batch, length, kv_heads, head_dim)
    if spec.qk_norm:
        q = _norm(p["q_norm"], q, spec)
        k = _norm(p["k_norm"], k, spec)
    if spec.positional == "rotary":
        q = _rotary(q, positions_BxT, inv_freq_K2)
        k = _rotary(k, positions_BxT, inv_freq_K2)
    scale = spec.attn_scale or 1.0 / math.sqrt(head_dim)
    if cache is None and not want_probs and isinstance(allowed, attention_lib.Mask):
        # Self-attention without probabilities to return: the implementation of the platform
        # (`attention.self_attention`; l2l's probabilities and the KV cache stay on the tiled path).
        out_BxTxHxK = attention_lib.self_attention(
            q, k, v, allowed, scale=scale, cap=spec.attn_softcap, implementation=spec.attention
        )
        out = linear(
            p["o"], out_BxTxHxK.reshape(batch, length, -1), "attn/o", quantizer, packed_kernel
        )
        return out, None, None
    k_BxNxTxK = k.transpose(0, 2, 1, 3)
    v_BxNxTxK = v.transpose(0, 2, 1, 3)
    keys_BxNxSxK, values_BxNxSxK, new_kv = k_BxNxTxK, v_BxNxTxK, None
    if cache is not None:
        # The whole stack is updated in place (it is the scan's carry), then this layer's
        # slots are read back: no copy of the stack per layer or per decoding step.
        keys_L, values_L, layer_index, index = cache
        start = (layer_index, 0, 0, index, 0)
        keys_L = lax.dynamic_update_slice(keys_L, k_BxNxTxK[None].astype(keys_L.dtype), start)
        values_L = lax.dynamic_update_slice(values_L, v_BxNxTxK[None].astype(values_L.dtype), start)
        keys_BxNxSxK = lax.dynamic_index_in_dim(keys_L, layer_index, keepdims=False)
        values_BxNxSxK = lax.dynamic_index_in_dim(values_L, layer_index, keepdims=False)
        new_kv = (keys_L, values_L)
    q_BxNxGxTxK = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    slots = keys_BxNxSxK.shape[2]
    if isinstance(allowed, attention_lib.Mask):
        allowed = allowed.dense(length)
    # Without a cache, query t sees keys <= t only. So it does when this call fills every slot
    # of a cache (it then starts writing at slot 0); otherwise slots are not positions.
    out_BxNxGxTxK, probs = attention_lib.tiled(
        q_BxNxGxTxK,
        keys_BxNxSxK,
        values_BxNxSxK,
        allowed,
        scale=scale,
        cap=spec.attn_softcap,
        value_dtype=v.dtype,
        want_probs=want_probs,
        keys_are_positions=cache is None or slots == length,
    )
    out_BxTxD = out_BxNxGxTxK.transpose(0, 3, 1, 2, 4).reshape(batch, length, -1)
    out = linear(p["o"], out_BxTxD, "attn/o", quantizer, packed_kernel)
    if want_probs:
        probs = probs.reshape(batch, spec.num_heads, length, slots)
    return out, probs if want_probs else None, new_kv


def _mlp(
    p: Params, x: jax.Array, spec: ModelSpec, quantizer: Quantizer | None, packed_kernel: str
) -> jax.Array:
    if spec.gated_mlp:
        gate, up = linears(
            [p["gate"], p["up"]], x, ["mlp/gate", "mlp/up"], quantizer, packed_kernel
        )
        hidden = _activation(gate, spec.activation) * up
    else:
        up = linear(p["up"], x, "mlp/up", quantizer, packed_kernel)
        hidden = _activation(up, spec.activation)
    return linear(p["down"], hidden, "mlp/down", quantizer, packed_kernel)


def _block(
    layer: Params,
    h: jax.Array,
    spec: ModelSpec,
    positions_BxT: jax.Array,
    inv_freq_K2: jax.Array,
    allowed: jax.Array,
    quantizer: Quantizer | None,
    cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    want_probs: bool = False,
    packed_kernel: str = "auto",
) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array] | None]:
    if spec.pre_norm:
        attn_out, probs, new_kv = _attention(
            layer["attn"],
            _norm(layer["attn_norm"], h, spec),
            spec,
            positions_BxT,
            inv_freq_K2,
            allowed,
            quantizer,
            cache,
            want_probs,
            packed_kernel,
        )
        if spec.post_norms:  # Gemma: the sublayer's output is normalised before the residual add
            attn_out = _norm(layer["post_attn_norm"], attn_out, spec)
        h = h + attn_out
        mlp_out = _mlp(
            layer["mlp"], _norm(layer["mlp_norm"], h, spec), spec, quantizer, packed_kernel
        )
        if spec.post_norms:
            mlp_out = _norm(layer["post_mlp_norm"], mlp_out, spec)
        h = h + mlp_out
    else:  # OPT-350m: normalise after each residual add.
        attn_out, probs, new_kv = _attention(
            layer["attn"],
            h,
            spec,
            positions_BxT,
            inv_freq_K2,
            allowed,
            quantizer,
            cache,
            want_probs,
            packed_kernel,
        )
        h = _norm(layer["attn_norm"], h + attn_out, spec)
        mlp_out = _mlp(layer["mlp"], h, spec, quantizer, packed_kernel)
        h = _norm(layer["mlp_norm"], h + mlp_out, spec)
    return h, probs, new_kv


def default_positions(
    tokens_BxT: jax.Array, mask_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None = None
) -> jax.Array:
    """Position ids: 0, 1, 2, ... counted over the real tokens (left padding starts at 0),
    starting again at 0 with each segment (document) when `segment_ids_BxT` is given."""
    if mask_BxT is None and segment_ids_BxT is None:
        return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    counted_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1)
    if segment_ids_BxT is not None:
        # Subtract the count before each segment's first token (a running maximum: the counts
        # never decrease along a row).
        starts_BxT = jnp.concatenate(
            [
                jnp.ones_like(segment_ids_BxT[:, :1], bool),
                segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1],
            ],
            axis=1,
        )
        before_BxT = jnp.where(starts_BxT, counted_BxT - mask_BxT.astype(jnp.int32), 0)
        counted_BxT = counted_BxT - lax.cummax(before_BxT, axis=1)
    return jnp.maximum(counted_BxT - 1, 0)


def embed(params: Params, tokens_BxT: jax.Array, positions_BxT: jax.Array, spec: ModelSpec):
    """Token (+ learned position) embedding, with OPT's project_in."""
    table = params["embed"]["tokens"]
    h = jnp.take(table, tokens_BxT, axis=0)
    if spec.embed_scale:
        # Gemma rounds sqrt(D) to the embedding's dtype first (25.25 for D = 640 in bfloat16).
        h = h * jnp.asarray(spec.embed_scale, table.dtype)
    if spec.embed_proj_dim:
        h = h @ params["project_in"]["kernel"].astype(h.dtype)
    if spec.positional == "learned":
        h = h + jnp.take(params["positions"], positions_BxT + spec.position_offset, axis=0)
    return h


def final_hidden(params: Params, h_BxTxD: jax.Array, spec: ModelSpec) -> jax.Array:
    """The last block's output through the final norm and OPT's project_out: the head's input,
    and the last entry of Hugging Face's `hidden_states` (which ends after both)."""
    if spec.final_norm:
        h_BxTxD = _norm(params["final_norm"], h_BxTxD, spec)
    if spec.embed_proj_dim:
        h_BxTxD = h_BxTxD @ params["project_out"]["kernel"].astype(h_BxTxD.dtype)
    return h_BxTxD


def head(params: Params, h_BxTxE: jax.Array, spec: ModelSpec) -> jax.Array:
    """The LM head (tied or not) and Gemma 2's logit soft cap: `final_hidden`'s output to
    logits."""
    if spec.tie_embeddings:
        table = params["embed"]["tokens"].astype(h_BxTxE.dtype)
        logits = jnp.einsum("...e,ve->...v", h_BxTxE, table)
    else:
        logits = h_BxTxE @ params["lm_head"]["kernel"].astype(h_BxTxE.dtype)
    return _softcap(logits, spec.logit_softcap) if spec.logit_softcap else logits


def unembed(params: Params, h_BxTxD: jax.Array, spec: ModelSpec) -> jax.Array:
    """Final norm, OPT's project_out and the LM head: the last block's output to logits."""
    return head(params, final_hidden(params, h_BxTxD, spec), spec)


# What `forward(collect=...)` can return beside the logits.
COLLECTABLE = ("hidden", "attn_probs")


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    spec: ModelSpec,
    *,
    mask_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    quantizer: Quantizer | None = None,
    collect: Sequence[str] = (),
    remat: bool | str = False,
    packed_kernel: str = "auto",
    pipeline: pipeline_lib.Pipeline | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the decoder.

    Args:
      params: the parameter pytree (see the module docstring).
      tokens_BxT: int token ids.
      spec: the architecture.
      mask_BxT: 1 for real tokens, 0 for padding; padded keys are never attended to.
      positions_BxT: position ids; by default counted over the real tokens, from 0 again in
        each segment when `segment_ids_BxT` is given.
      segment_ids_BxT: int (B, T), the document of each token, for several documents packed
        into one row (`data.document_attention`): a token attends only to earlier tokens of its
        own segment, so each document is read as if it were alone (with restarted positions).
        None: attention crosses documents.
      quantizer: optional `quantizer(name, layer_params) -> kernel` applied in every linear().
      collect: any of COLLECTABLE, what Hugging Face returns with `output_hidden_states` and
        `output_attentions` (what the authors' layer-to-layer distillation matches): "hidden",
        a tuple of L+1 (B, T, .) arrays, the embedding output and every block's output, the
        last one after the final norm (and OPT's project_out, so (B, T, E) there), i.e. the
        head's input; "attn_probs", every layer's post-softmax attention probabilities,
        (L, B, H, T, T) float32, 0 where a key is masked.
      remat: what the backward pass recomputes of each block (jax.checkpoint on the scanned
        block), one of REMAT_MODES: "none" (or False) keeps every activation; "dots" keeps only
        the matmul outputs and recomputes the cheap rest (norms, activations, fake-quantized
        kernels); "full" (or True) keeps only each block's input.
      packed_kernel: the matmul of packed layers (a packed model), one of `export.KERNELS`:
        "auto" runs the Pallas GPU kernel where the program is compiled for a GPU, the Pallas
        TPU kernel on a TPU (for the formats it tiles) and XLA's dequantize-then-dot elsewhere;
        "pallas", "interpret", "pallas_tpu", "interpret_tpu" or "xla" force one.
      pipeline: run the layer scan as a microbatched pipeline over the mesh's "stage" axis
        (`pipeline.Pipeline`); not with `collect`. Same result as without, up to rounding.

    Returns:
      logits (B, T, V), or (logits, aux) when `collect` is not empty.
    """
    unknown = sorted(set(collect) - set(COLLECTABLE))
    if unknown:
        raise ValueError(f"collect: unknown {unknown}; expected any of {COLLECTABLE}")
    h, per_layer, _ = _trunk(
        params,
        tokens_BxT,
        spec,
        mask_BxT,
        positions_BxT,
        quantizer,
        collect,
        remat=remat,
        packed_kernel=packed_kernel,
        pipeline=pipeline,
        segment_ids_BxT=segment_ids_BxT,
    )
    last = final_hidden(params, h, spec)
    logits = head(params, last, spec)
    if not collect:
        return logits
    aux = {}
    if "hidden" in collect:
        # Hugging Face's tuple: the input of every block, then the normed output of the last.
        block_inputs = per_layer["hidden"]
        aux["hidden"] = (*(block_inputs[i] for i in range(spec.num_layers)), last)
    if "attn_probs" in collect:
        aux["attn_probs"] = per_layer["attn_probs"]
    return logits, aux


def init_cache(spec: ModelSpec, batch: int, length: int, dtype: Any = jnp.float32) -> Params:
    """An empty key/value cache of `length` slots per row, for `hidden_states(..., cache=)`.

    Returns:
      {"keys", "values": (L, B, N, S, K); "mask": (B, S) 1 where a slot holds a real token;
      "positions": (B, S) position id of each slot; "index": () next slot to write;
      "next_position": (B,) position id of each row's next real token}.
    """
    shape = (spec.num_layers, batch, spec.num_kv_heads, length, spec.head_dim)
    return {
        "keys": jnp.zeros(shape, dtype),
        "values": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, length), jnp.int32),
        "positions": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
        "next_position": jnp.zeros((batch,), jnp.int32),
    }


def grow_cache(cache: Params, length: int) -> Params:
    """The same cache with empty slots appended up to `length` slots (a prefill can fill a
    cache of exactly the prompt's length, which lets its attention skip the causal half)."""
    extra = length - cache["mask"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot shrink a cache of {cache['mask'].shape[1]} slots to {length}")
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    return {
        **cache,
        "keys": pad(cache["keys"], 3),
        "values": pad(cache["values"], 3),
        "mask": pad(cache["mask"], 1),
        "positions": pad(cache["positions"], 1),
    }


def hidden_states(
    params: Params,
    tokens_BxT: jax.Array,
    spec: ModelSpec,
    *,
    mask_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    quantizer: Quantizer | None = None,
    cache: Params | None = None,
    packed_kernel: str = "auto",
    segment_ids_BxT: jax.Array | None = None,
) -> tuple[jax.Array, Params | None]:
    """The last block's output (before the final norm), optionally through a KV cache.

    Apply `unembed` to the positions whose logits are needed: scoring and generation skip the
    (T, V) logits of every other position.

    Args:
      params: the parameter pytree.
      tokens_BxT: int token ids.
      spec: the architecture.
      mask_BxT: 1 for real tokens, 0 for padding (left, right, or both).
      positions_BxT: position ids; by default counted over the real tokens (continuing from
        the cache's `next_position` when a cache is given).
      quantizer: as in `forward`.
      cache: from `init_cache`; the tokens are written at slots [index, index + T) and attend to
        every real token written before them. Local (GPT-Neo) windows count positions, not slots,
        so padding inside the cache does not shorten them.
      packed_kernel: as in `forward`.
      segment_ids_BxT: as in `forward` (without a cache only).

    Returns:
      (hidden (B, T, D), the updated cache or None).
    """
    h, _, new_cache = _trunk(
        params,
        tokens_BxT,
        spec,
        mask_BxT,
        positions_BxT,
        quantizer,
        (),
        cache,
        packed_kernel=packed_kernel,
        segment_ids_BxT=segment_ids_BxT,
    )
    return h, new_cache


REMAT_MODES = ("none", "dots", "full")


def _rematerialised(step: Callable, remat: bool | str | None) -> Callable:
    """The scan body under the `remat` mode of `forward`."""
    mode = {False: "none", None: "none", True: "full"}.get(remat, remat)
    if mode == "none":
        return step
    if mode == "full":
        return jax.checkpoint(step)
    if mode == "dots":
        # Faster than keeping everything on XLA:CPU (fewer stacked residuals zero-filled and
        # copied) at half the temporary memory (docs/benchmarks.md).
        return jax.checkpoint(step, policy=jax.checkpoint_policies.dots_saveable)
    raise ValueError(f"remat must be one of {REMAT_MODES} (or a bool), got {remat!r}")


def _trunk(
    params,
    tokens_BxT,
    spec,
    mask_BxT,
    positions_BxT,
    quantizer,
    collect,
    cache=None,
    remat=False,
    packed_kernel="auto",
    pipeline=None,
    segment_ids_BxT=None,
):
    """Embedding and the scanned blocks; the one body behind `forward` and `hidden_states`."""
    from tsld_jax.quant import export  # lazy, as in linear()

    export.check_kernel(packed_kernel)  # also for a float model: a typo should not pass
    # What differs between layers besides their parameters, scanned beside them.
    per_layer_consts = {
        "window": jnp.asarray(spec.layer_windows(), dtype=jnp.int32),
        "inv_freq": jnp.asarray(spec.layer_inv_frequencies()),
    }
    length = tokens_BxT.shape[1]
    if cache is not None and segment_ids_BxT is not None:
        raise ValueError("segment ids are for training blocks; a KV-cache call takes none")
    if cache is None:
        if positions_BxT is None:
            positions_BxT = default_positions(tokens_BxT, mask_BxT, segment_ids_BxT)
        windows = attention_lib.windows_of(spec.layer_windows())
        make_mask = lambda window: attention_lib.Mask(mask_BxT, window, windows, segment_ids_BxT)
    else:
        if mask_BxT is None:
            mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        mask_BxT = mask_BxT.astype(jnp.int32)
        index = cache["index"]
        if positions_BxT is None:
            counted_BxT = jnp.cumsum(mask_BxT, axis=-1) - 1
            positions_BxT = jnp.maximum(cache["next_position"][:, None] + counted_BxT, 0)
        key_mask_BxS = lax.dynamic_update_slice(cache["mask"], mask_BxT, (0, index))
        key_positions_BxS = lax.dynamic_update_slice(
            cache["positions"], positions_BxT.astype(jnp.int32), (0, index)
        )
        query_slot_T = index + jnp.arange(length)
        key_slot_S = jnp.arange(key_mask_BxS.shape[1])
        causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
        distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
        valid_BxTxS = causal_TxS[None] & (key_mask_BxS[:, None, :] > 0)

        def make_mask(window):
            inside = (window == 0) | (distance_BxTxS < window)
            return (valid_BxTxS & inside)[:, None, None]

    h = embed(params, tokens_BxT, positions_BxT, spec)

    if pipeline is not None and (pipeline.stages > 1 or pipeline.microbatches > 1):
        if cache is not None or collect:
            raise ValueError("a pipelined forward takes no cache and collects nothing")

        def layer_fn(layer, h, positions_BxT, masks, consts):
            mask_BxT, segment_ids_BxT = masks
            allowed = attention_lib.Mask(mask_BxT, consts["window"], windows, segment_ids_BxT)
            return _block(
                layer,
                h,
                spec,
                positions_BxT,
                consts["inv_freq"],
                allowed,
                quantizer,
                packed_kernel=packed_kernel,
            )[0]

        body = _rematerialised(layer_fn, remat)
        masks = (mask_BxT, segment_ids_BxT)
        h = pipeline_lib.run(
            body, params["layers"], per_layer_consts, h, positions_BxT, masks, pipeline
        )
        return h, {}, None

    # With a cache, the stacked keys/values ride in the scan's carry and each layer updates its
    # own slots in place. (Passing them as per-layer inputs and writing the new slots after the
    # scan made XLA copy the whole stack once more per call: several times slower decoding.)
    def step(carry, xs):
        h, kv = carry
        layer, consts, layer_index = xs
        layer_cache = None if kv is None else (*kv, layer_index, cache["index"])
        new_h, probs, kv = _block(
            layer,
            h,
            spec,
            positions_BxT,
            consts["inv_freq"],
            make_mask(consts["window"]),
            quantizer,
            layer_cache,
            want_probs="attn_probs" in collect,
            packed_kernel=packed_kernel,
        )
        outputs = {}
        if "hidden" in collect:
            outputs["hidden"] = h
        if "attn_probs" in collect:
            outputs["attn_probs"] = probs
        return (new_h, kv), outputs

    kv = None if cache is None else (cache["keys"], cache["values"])
    layer_indices = jnp.arange(spec.num_layers, dtype=jnp.int32)
    body = _rematerialised(step, remat)
    xs = (params["layers"], per_layer_consts, layer_indices)
    (h, kv), per_layer = lax.scan(body, (h, kv), xs)
    new_cache = None
    if cache is not None:
        new_cache = {
            "keys": kv[0],
            "values": kv[1],
            "mask": key_mask_BxS,
            "positions": key_positions_BxS,
            "index": cache["index"] + length,
            "next_position": cache["next_position"] + jnp.sum(mask_BxT, axis=-1),
        }
    return h, per_layer, new_cache


def param_shapes(spec: ModelSpec) -> Params:
    """Shapes of every parameter, as a pytree of tuples (the layout of the module docstring)."""
    d, e, layers = spec.hidden_size, spec.embed_dim, spec.num_layers
    q_out = spec.num_heads * spec.head_dim
    kv_out = spec.num_kv_heads * spec.head_dim

    def lin(n_in, n_out, bias):
        p = {"kernel": (layers, n_in, n_out)}
        if bias:
            p["bias"] = (layers, n_out)
        return p

    def norm(*lead, width=d):
        p = {"scale": (*lead, width)}
        if spec.norm == "layernorm":
            p["bias"] = (*lead, width)
        return p

    mlp = {
        "up": lin(d, spec.mlp_size, spec.mlp_bias),
        "down": lin(spec.mlp_size, d, spec.mlp_bias),
    }
    if spec.gated_mlp:
        mlp["gate"] = lin(d, spec.mlp_size, spec.mlp_bias)
    attn = {
        "q": lin(d, q_out, spec.attn_bias),
        "k": lin(d, kv_out, spec.attn_bias),
        "v": lin(d, kv_out, spec.attn_bias),
        "o": lin(q_out, d, spec.attn_out_bias),
    }
    if spec.qk_norm:
        attn["q_norm"] = norm(layers, width=spec.head_dim)
        attn["k_norm"] = norm(layers, width=spec.head_dim)
    shapes: Params = {
        "embed": {"tokens": (spec.vocab_size, e)},
        "layers": {"attn_norm": norm(layers), "attn": attn, "mlp_norm": norm(layers), "mlp": mlp},
    }
    if spec.post_norms:
        shapes["layers"]["post_attn_norm"] = norm(layers)
        shapes["layers"]["post_mlp_norm"] = norm(layers)
    if spec.positional == "learned":
        shapes["positions"] = (spec.max_positions, d)
    if spec.final_norm:
        shapes["final_norm"] = norm()
    if spec.embed_proj_dim:
        shapes["project_in"] = {"kernel": (e, d)}
        shapes["project_out"] = {"kernel": (d, e)}
    if not spec.tie_embeddings:
        shapes["lm_head"] = {"kernel": (e, spec.vocab_size)}
    return shapes


def init_params(rng: jax.Array, spec: ModelSpec, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) weights, unit norms, zero biases)."""
    shapes = param_shapes(spec)
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, shape), key in zip(leaves, keys, strict=True):
        name = getattr(path[-1], "key", "")
        if name == "scale":  # a unit norm: scale 1, stored as 1 - offset where (offset + w)
            out.append(jnp.full(shape, 1.0 - spec.norm_offset, dtype))
        elif name == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(key, shape)).astype(dtype))
    return jax.tree.unflatten(treedef, out)

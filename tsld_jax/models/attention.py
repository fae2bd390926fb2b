"""Causal self-attention, one function over three implementations chosen per platform.

`self_attention` computes softmax(scale * q k^T, soft-capped, masked) v for a decoder's own
tokens (no KV cache): causal, grouped-query (fewer key/value heads than query heads), an optional
sliding window, an optional padding mask and optional segment ids (documents packed into one
block, attention kept within each: `data.document_attention`). Which code runs is `implementation`
(`ModelSpec.attention`, config `model.attention`), one of IMPLEMENTATIONS:

- "xla": `tiled`, the hand-written path: float32 scores materialised per QUERY_TILE queries and
  softmaxed in XLA. Right for the CPU; on an accelerator its scores are B x H x T x T floats per
  layer, kept for the backward pass.
- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention(...,
  implementation="cudnn")` (NVIDIA GPUs). cuDNN takes bf16/fp16 only: a float32 model's queries,
  keys and values are rounded to bf16 for it, its output cast back.
- "pallas": the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`), inside a
  `shard_map` when a mesh is in context (Mosaic kernels are not partitioned automatically).
- "pallas_interpret": the same kernel in Pallas interpret mode: runs on the CPU, for tests.
- "auto": chosen when the program is lowered, for the platform it is lowered for (like the
  packed matmul's "auto"): cuDNN on CUDA for bf16/fp16 inputs (where jax finds the cuDNN
  library), splash on TPU (on a TPU host, or traced inside `for_tpu()`), "xla" elsewhere.

What the fused kernels cannot express falls back to "xla", for "auto" and explicit choices
alike: attention soft-capping (Gemma 2) on cuDNN, and head dims cuDNN refuses (above 128 on
Ampere, above 256 on Hopper, or not a multiple of 8), and segment ids on cuDNN
(`jax.nn.dot_product_attention` has no argument for them). The l2l loss needs the attention
probabilities and the KV-cache (generation) path attends over cache slots, not positions: the
decoder keeps both on `tiled`, which returns probabilities.

Under `train.remat` "dots" (save matmul outputs only) the fused kernels' outputs are not matmuls,
so the backward pass runs their forward again; whether saving them pays is for a GPU to measure
(bench/gpu_check.sh's attention_step stage runs the default, "dots").

Padding: cuDNN only knows per-row lengths (real tokens first). A padded row is compacted, its
real tokens gathered to the front in order, attended with the row's length, and scattered back;
for left or right padding that is exactly the masked attention, and for padding between real
tokens a sliding window then counts real tokens rather than slots. Splash attention takes the
mask as segment ids (real 1, padding 0), exact for any mask. At padded query positions the
outputs differ between implementations (nothing reads them: padded keys are never attended to,
and the losses mask padded positions).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "pallas_interpret")

# Queries are processed in tiles of this many positions. Each tile's (T_tile, S) scores stay in
# the CPU's cache, and without a KV cache a tile only needs the keys up to its own last position
# (the later ones are all masked by causality), which skips ~3/8 of the attention arithmetic at
# T = 512. 128 was the fastest tile tried on the CPU (docs/benchmarks.md, "Measurements behind
# design choices").
QUERY_TILE = 128

# Splash attention's default (and smallest lane-aligned) block; sequences are padded to it.
_SPLASH_BLOCK = 128


def check_implementation(name: str) -> str:
    """Returns `name` if it is one of IMPLEMENTATIONS, else raises ValueError."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; expected {IMPLEMENTATIONS}")
    return name


class Mask(NamedTuple):
    """The mask of self-attention without a cache, in the form the fused kernels take.

    Attributes:
      key_mask_BxT: 1 for real tokens, 0 for padding; None when every token is real.
      window: a query sees keys fewer than this many positions back; 0 is unbounded. Traced
        inside the decoder's layer scan; its possible values are `windows`.
      windows: every value `window` can take (static): the fused kernels compile one variant
        per window and pick one with `lax.switch`.
      segment_ids_BxT: the document of each token (`data.document_attention`); a query sees
        only keys of its own segment. None: one segment (attention crosses documents).
    """

    key_mask_BxT: jax.Array | None
    window: jax.Array | int
    windows: tuple[int, ...] = (0,)
    segment_ids_BxT: jax.Array | None = None

    def dense(self, length: int) -> jax.Array:
        """The boolean (B or 1, 1, 1, T, T) mask of `attention_mask`."""
        index_T = jnp.arange(length)
        return attention_mask(
            index_T, index_T, self.key_mask_BxT, self.window, self.segment_ids_BxT
        )


def attention_mask(
    query_index_T: jax.Array,
    key_index_S: jax.Array,
    key_mask_BxS: jax.Array | None,
    window: jax.Array | int,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Boolean (B or 1, 1, 1, T, S) mask: causal, optional sliding window, optional padding,
    optional segments (queries and keys are the same T tokens then: T == S)."""
    distance_TxS = query_index_T[:, None] - key_index_S[None, :]
    allowed_TxS = (distance_TxS >= 0) & ((window == 0) | (distance_TxS < window))
    allowed = allowed_TxS[None, None, None]
    if key_mask_BxS is not None:
        allowed = allowed & (key_mask_BxS[:, None, None, None, :] > 0)
    if segment_ids_BxT is not None:
        same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        allowed = allowed & same_BxTxT[:, None, None]
    return allowed


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): Gemma 2's bound on attention scores and logits."""
    return jnp.tanh(x / cap) * cap


def _attend(
    q_BxNxGxTxK: jax.Array,
    keys_BxNxSxK: jax.Array,
    values_BxNxSxK: jax.Array,
    allowed: jax.Array,
    scale: float,
    cap: float,
    value_dtype: Any,
) -> tuple[jax.Array, jax.Array]:
    """softmax(soft-capped scaled q k^T, masked) v for one tile of queries; returns (out,
    the float32 attention probabilities)."""
    scores_BxNxGxTxS = jnp.einsum(
        "bngtk,bnsk->bngts", q_BxNxGxTxK.astype(jnp.float32), keys_BxNxSxK.astype(jnp.float32)
    )
    scores_BxNxGxTxS = scores_BxNxGxTxS * jnp.float32(scale)
    if cap:
        scores_BxNxGxTxS = softcap(scores_BxNxGxTxS, cap)
    masked = jnp.where(allowed, scores_BxNxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxNxGxTxS = jax.nn.softmax(masked, axis=-1)
    out_BxNxGxTxK = jnp.einsum(
        "bngts,bnsk->bngtk",
        probs_BxNxGxTxS.astype(value_dtype),
        values_BxNxSxK.astype(value_dtype),
    )
    return out_BxNxGxTxK, probs_BxNxGxTxS


def tiled(
    q_BxNxGxTxK: Float[Array, "B N G T K"],
    keys_BxNxSxK: Float[Array, "B N S K"],
    values_BxNxSxK: Float[Array, "B N S K"],
    allowed: jax.Array,
    *,
    scale: float,
    cap: float = 0.0,
    value_dtype: Any = None,
    want_probs: bool = False,
    keys_are_positions: bool = True,
) -> tuple[Float[Array, "B N G T K"], Float[Array, "B N G T S"] | None]:
    """The "xla" implementation: scores in float32, one QUERY_TILE of queries at a time.

    Args:
      q_BxNxGxTxK: queries, heads-first and grouped by key/value head (N kv heads x G groups).
      keys_BxNxSxK, values_BxNxSxK: keys and values of S slots.
      allowed: boolean mask broadcastable to (B, 1, 1, T, S).
      scale: multiplies q k^T.
      cap: soft-cap of the scores (0: none).
      value_dtype: the dtype of the probabilities and the output (default: the values').
      want_probs: also return the post-softmax probabilities of all T queries (one tile of T),
        in float32 (the l2l loss matches them).
      keys_are_positions: slot s holds position s (no cache, or a cache this call fills
        whole), so a tile of queries reads only the keys up to its own end.

    Returns:
      (out (B, N, G, T, K), probabilities (B, N, G, T, S) if want_probs else None).
    """
    length, slots = q_BxNxGxTxK.shape[3], keys_BxNxSxK.shape[2]
    value_dtype = value_dtype or values_BxNxSxK.dtype
    tile = length if want_probs else QUERY_TILE
    outs, probs = [], None
    for start in range(0, length, tile):
        end = min(start + tile, length)
        # Query t sees keys <= t only, so the tile stops at its own end when slots are positions.
        limit = end if keys_are_positions else slots
        out, probs = _attend(
            q_BxNxGxTxK[:, :, :, start:end],
            keys_BxNxSxK[:, :, :limit],
            values_BxNxSxK[:, :, :limit],
            allowed[..., start:end, :limit],
            scale,
            cap,
            value_dtype,
        )
        outs.append(out)
    out_BxNxGxTxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BxNxGxTxK, probs if want_probs else None


def self_attention(
    q_BxTxHxK: Float[Array, "B T H K"],
    k_BxTxNxK: Float[Array, "B T N K"],
    v_BxTxNxK: Float[Array, "B T N K"],
    mask: Mask,
    *,
    scale: float,
    cap: float = 0.0,
    implementation: str = "auto",
) -> Float[Array, "B T H K"]:
    """Causal self-attention of T tokens over themselves, by `implementation`.

    Args:
      q_BxTxHxK: queries (rotary embedding applied), H query heads.
      k_BxTxNxK, v_BxTxNxK: keys and values of N heads (H a multiple of N: grouped-query).
      mask: padding, sliding window and segments (`Mask`).
      scale: multiplies q k^T (1/sqrt(K) for most models).
      cap: soft-cap of the scores, cap * tanh(s / cap); 0 means none.
      implementation: one of IMPLEMENTATIONS (see the module docstring).

    Returns:
      (B, T, H, K) in the values' dtype.
    """
    check_implementation(implementation)
    args = (q_BxTxHxK, k_BxTxNxK, v_BxTxNxK, mask)
    options = {"scale": scale, "cap": cap}
    xla = functools.partial(_xla, **options)
    if implementation == "xla":
        return xla(*args)
    if implementation == "cudnn":
        return _cudnn(*args, **options, fallback=xla) if _cudnn_present() else xla(*args)
    if implementation in ("pallas", "pallas_interpret"):
        return _splash(*args, **options, interpret=implementation == "pallas_interpret")
    # "auto". Interpret mode is a test tool, never chosen. cuDNN needs its library when the
    # program is traced (jax asks it for its version); without one, CUDA gets the XLA path. The
    # splash kernel is traced only on a TPU host or inside `for_tpu()`: tracing it costs every
    # CPU forward pass (+35% in a test of many small ones), libtpu installed or not.
    half = q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16)
    cuda = functools.partial(_cudnn, **options, fallback=xla)
    tpu = functools.partial(_splash, **options, interpret=False)

    def static_windows(fn):  # the operands are arrays; the windows stay static
        return lambda q, k, v, key_mask, window, segments: fn(
            q, k, v, Mask(key_mask, window, mask.windows, segments)
        )

    return lax.platform_dependent(
        q_BxTxHxK,
        k_BxTxNxK,
        v_BxTxNxK,
        mask.key_mask_BxT,
        mask.window,
        mask.segment_ids_BxT,
        cuda=static_windows(cuda if half and _cudnn_present() else xla),
        tpu=static_windows(tpu if _for_tpu() else xla),
        default=static_windows(xla),
    )


def _xla(q_BxTxHxK, k_BxTxNxK, v_BxTxNxK, mask: Mask, *, scale, cap):
    batch, length, heads, head_dim = q_BxTxHxK.shape
    kv_heads = k_BxTxNxK.shape[2]
    q_BxNxGxTxK = q_BxTxHxK.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    out_BxNxGxTxK, _ = tiled(
        q_BxNxGxTxK.transpose(0, 2, 3, 1, 4),
        k_BxTxNxK.transpose(0, 2, 1, 3),
        v_BxTxNxK.transpose(0, 2, 1, 3),
        mask.dense(length),
        scale=scale,
        cap=cap,
    )
    return out_BxNxGxTxK.transpose(0, 3, 1, 2, 4).reshape(q_BxTxHxK.shape)


def _by_window(mask: Mask, make, *operands):
    """`make(window)(*operands)` for the mask's traced window, each static window compiled once
    (cuDNN and splash attention take their window as a static argument)."""
    windows = tuple(dict.fromkeys(mask.windows))
    branches = [make(window) for window in windows]
    if len(branches) == 1:
        return branches[0](*operands)
    index = jnp.argmax(jnp.asarray(windows, jnp.int32) == mask.window)
    return lax.switch(index, branches, *operands)


# --------------------------------------------------------------------------------------- cuDNN


_FOR_TPU = contextvars.ContextVar("tsld_jax_attention_for_tpu", default=False)


@contextlib.contextmanager
def for_tpu() -> Iterator[None]:
    """ "auto" traced inside also carries the splash kernel for a TPU lowering, where the host's
    backend is not a TPU (a deviceless compile for TPUs). `--plan`'s TPU rows do not use it:
    they plan the tiled path (docs/scaling.md)."""
    token = _FOR_TPU.set(True)
    try:
        yield
    finally:
        _FOR_TPU.reset(token)


def _for_tpu() -> bool:
    """Whether "auto" carries the splash kernel for a TPU: on a TPU host, or inside for_tpu()."""
    return _FOR_TPU.get() or jax.default_backend() == "tpu"


@functools.cache
def _cudnn_present() -> bool:
    """Whether jax finds the cuDNN library, which it asks for its version when it traces cuDNN
    attention (so even to compile for a GPU from a CPU host: `nvidia-cudnn-cu12`)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo

        return bool(fused_attention_stablehlo.check_cudnn_version())
    except Exception:  # ImportError, or RuntimeError("cuDNN not found")
        return False


def _cudnn_max_head_dim() -> int:
    """cuDNN's flash attention takes head dims up to 256 on Hopper and later, 128 before; jax
    checks against the local GPU (128 when there is none), so that is what counts here too."""
    try:
        gpus = jax.local_devices(backend="gpu")
    except Exception:  # no GPU backend here (RuntimeError), or no plugin
        return 128
    capability = getattr(gpus[0], "compute_capability", "0") if gpus else "0"
    return 256 if float(capability) >= 9.0 else 128


def _cudnn(q_BxTxHxK, k_BxTxNxK, v_BxTxNxK, mask: Mask, *, scale, cap, fallback, backend="cudnn"):
    # `backend` "xla" runs the same call through jax's XLA attention: tests check this
    # function's argument mapping on the CPU that way (cuDNN itself needs a GPU).
    head_dim = q_BxTxHxK.shape[-1]
    segmented = mask.segment_ids_BxT is not None
    if cap or head_dim % 8 or head_dim > _cudnn_max_head_dim() or segmented:
        # Soft-capped scores (Gemma 2) and these head dims have no cuDNN flash kernel; and
        # `jax.nn.dot_product_attention` takes no segment ids (only per-row lengths, and a
        # dense bias or mask, which cuDNN's kernel would read as a (T, T) tensor per row):
        # attention kept within documents runs on the tiled path.
        return fallback(q_BxTxHxK, k_BxTxNxK, v_BxTxNxK, mask)
    out_dtype = v_BxTxNxK.dtype
    q, k, v = q_BxTxHxK, k_BxTxNxK, v_BxTxNxK
    if backend == "cudnn":  # bf16/fp16 only
        half = jnp.float16 if q.dtype == jnp.float16 else jnp.bfloat16
        q, k, v = (x.astype(half) for x in (q, k, v))
    batch, length = q.shape[:2]
    lengths_B = None
    if mask.key_mask_BxT is not None:
        # Real tokens to the front, in order (a stable sort of "is padding"); see the module
        # docstring for why this is exact for left and right padding.
        order_BxT = jnp.argsort(mask.key_mask_BxT <= 0, axis=1, stable=True)
        q, k, v = (jnp.take_along_axis(x, order_BxT[:, :, None, None], axis=1) for x in (q, k, v))
        lengths_B = jnp.sum(mask.key_mask_BxT > 0, axis=1, dtype=jnp.int32)
    # jax 0.10-0.11 hand cuDNN an empty bias in training and then refuse odd sequence lengths
    # ("Unsupported sequence length"; the student reads T - 1 = 511 tokens): one padding slot,
    # left out by the row lengths.
    pad = length % 2
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if lengths_B is None:
            lengths_B = jnp.full((batch,), length, jnp.int32)

    def attend(window):
        def run(q, k, v, lengths_B):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=True,
                query_seq_lengths=lengths_B,
                key_value_seq_lengths=lengths_B,
                # (left, right): a query sees `window - 1` keys back and itself.
                local_window_size=(window - 1, 0) if window else None,
                implementation=backend,
            )

        return run

    out_BxTxHxK = _by_window(mask, attend, q, k, v, lengths_B)[:, :length]
    if mask.key_mask_BxT is not None:
        inverse_BxT = jnp.argsort(order_BxT, axis=1)
        out_BxTxHxK = jnp.take_along_axis(out_BxTxHxK, inverse_BxT[:, :, None, None], axis=1)
    return out_BxTxHxK.astype(out_dtype)


# ------------------------------------------------------------------------------ Pallas (TPU)


# Built inside each trace (its mask tables become the trace's constants); the numpy work behind
# them is cached by jax (`splash_attention_mask_info._process_mask`).
def _splash_kernel(heads: int, length: int, window: int, cap: float, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    if window:  # (left, right): `window - 1` keys back and the query itself
        head_mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    else:
        head_mask = splash.CausalMask(shape)
    block = min(_SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads),
        block_sizes=sizes,
        attn_logits_soft_cap=cap or None,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _splash(q_BxTxHxK, k_BxTxNxK, v_BxTxNxK, mask: Mask, *, scale, cap, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, _ = q_BxTxHxK.shape
    padded = -(-length // _SPLASH_BLOCK) * _SPLASH_BLOCK
    key_mask_BxT = mask.key_mask_BxT
    if key_mask_BxT is None and padded != length:
        key_mask_BxT = jnp.ones((batch, length), jnp.int32)
    # The kernel takes q k^T unscaled: the scale goes into the queries (as the reference and
    # transformers' flash paths do), in the queries' dtype.
    q_BxHxTxK = (q_BxTxHxK * jnp.asarray(scale, q_BxTxHxK.dtype)).transpose(0, 2, 1, 3)
    k_BxNxTxK, v_BxNxTxK = k_BxTxNxK.transpose(0, 2, 1, 3), v_BxTxNxK.transpose(0, 2, 1, 3)
    extra = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    q_BxHxTxK, k_BxNxTxK, v_BxNxTxK = (jnp.pad(x, extra) for x in (q_BxHxTxK, k_BxNxTxK, v_BxNxTxK))
    segments_BxT = None
    if key_mask_BxT is None and mask.segment_ids_BxT is not None:
        key_mask_BxT = jnp.ones((batch, length), jnp.int32)
    if key_mask_BxT is not None:
        # Real tokens are segment 1 and padding (appended slots included) segment 0: a query
        # attends within its segment, so real queries never see padding. With documents, a real
        # token's segment is its document's id + 1.
        real_BxT = (key_mask_BxT > 0).astype(jnp.int32)
        if mask.segment_ids_BxT is not None:
            real_BxT = real_BxT * (mask.segment_ids_BxT.astype(jnp.int32) + 1)
        segments_BxT = jnp.pad(real_BxT, ((0, 0), (0, padded - length)))

    def attend(window):
        kernel = _splash_kernel(heads, padded, window, cap, interpret)

        def run(q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, segments_BxT):
            def one(q, k, v, segments_T):
                ids = None if segments_T is None else splash.SegmentIds(segments_T, segments_T)
                return kernel(q, k, v, segment_ids=ids)

            return jax.vmap(one)(q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, segments_BxT)

        return _in_shard_map(run, heads, k_BxNxTxK.shape[1], segments_BxT is not None)

    out_BxHxTxK = _by_window(mask, attend, q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, segments_BxT)
    return out_BxHxTxK[:, :, :length].transpose(0, 2, 1, 3).astype(v_BxTxNxK.dtype)


def _in_shard_map(run, heads: int, kv_heads: int, segmented: bool):
    """`run` inside a shard_map over the mesh in context, if any: Mosaic kernels are not
    partitioned automatically. Rows split over the data-like axes, heads over "tensor" when
    both head counts divide (the layout `sharding.py` gives activations)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return run
    if jax.sharding.AxisType.Manual in mesh.axis_types:  # already inside a shard_map
        return run
    from jax.sharding import PartitionSpec as P

    rows = tuple(axis for axis in ("data", "fsdp") if axis in mesh.shape) or None
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and not heads % tensor and not kv_heads % tensor else None
    spec = P(rows, head_axis, None, None)
    in_specs = (spec, spec, spec, P(rows, None) if segmented else None)
    # The kernel's outputs carry no varying-axes annotation, which shard_map's check demands.
    return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)


def windows_of(layer_windows: Sequence[int]) -> tuple[int, ...]:
    """The distinct per-layer windows, in order (`Mask.windows`)."""
    return tuple(dict.fromkeys(int(w) for w in layer_windows))


__all__ = [
    "IMPLEMENTATIONS",
    "Mask",
    "QUERY_TILE",
    "attention_mask",
    "check_implementation",
    "self_attention",
    "softcap",
    "tiled",
    "windows_of",
]

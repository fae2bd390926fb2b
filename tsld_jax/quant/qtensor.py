"""Deployable quantized weights: 2/4/8-bit packed integer codes plus scales (and zero points).

`pack(w, spec)` turns a latent float kernel `(..., in_features, out_features)` into a
`PackedWeight` pytree, and `unpack(packed)` gives back exactly (bit for bit) what
`quantizers.fake_quantize(w, spec)` computes, so an exported model reproduces the QAT forward.
This module is for export and inference only; `quantizers.py` alone decides *how* weights are
quantized during training.

Storage layout (K = in_features, N = out_features, one matrix; leading axes such as the stacked
layer axis L are carried along unchanged, so `lax.scan` slices a PackedWeight like any pytree):

- every weight becomes an integer value `v` in a container of 2, 4 or 8 bits: ternary (TWN) and
  2-bit weights use 2 bits, 3- and 4-bit weights 4 bits, 5- to 8-bit weights 8 bits;
- 2- and 4-bit containers are packed along K into int32 words: row `k` of the kernel lives in word
  row `k // P`, bits `[c * (k % P), c * (k % P) + c)`, with `P = 32 // c` values per word (16
  for 2 bits, 8 for 4 bits). Packing along K keeps one output column's codes in one word column,
  so a kernel tile `(block_k, block_n)` is the contiguous word tile `(block_k // P, block_n)`
  and every loaded 4-byte word is used whole; 8-bit containers are plain int8 `(K, N)`;
- the stored code is `v + offset` (a static per-format constant, so the symmetric methods store
  their signed level as an unsigned field and asymmetric 8-bit codes fit an int8);
- `scales` (float32, the very values the quantizer computed): TWN's alpha, asym's scale, sym's s
  (the weight is `level / s`), PACT+'s clip; shape `(n_groups, N)`: one row for "channel",
  `K / group_size` rows for "group", and `(1, 1)` for "tensor";
- `zeros` (asym only): the integer zero points, stored as bfloat16 (exact for 0..255), same
  shape as `scales`.

K is padded to a multiple of 64 (channel/tensor) or of lcm(group_size, 16) (group), and N to a
multiple of 64, so that power-of-two tiles divide the padded shape; padded codes are finite
and padded scales are 1, so padding never produces NaN (padded activation rows are zero and
padded output columns are sliced away by the kernels). `unpack` returns the unpadded shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float

from tsld_jax.quant import quantizers
from tsld_jax.quant.quantizers import QuantSpec

# Padded K and N are multiples of these (see the module docstring).
K_ALIGN = 64
N_ALIGN = 64
_PACK_UNIT = 16  # values per int32 word at 2 bits, the densest packing


def container_bits(bits: int) -> int:
    """The storage width (2, 4 or 8 bits) of a `bits`-bit weight."""
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    if bits <= 8:
        return 8
    raise ValueError(f"cannot pack {bits}-bit weights; at most 8 bits are supported")


@struct.dataclass
class PackedWeight:
    """A quantized kernel: packed integer codes, float32 scales, optional zero points.

    Attributes:
      codes: int32 `(..., Kp // P, Np)` words of `P = 32 // c` c-bit codes (c = 2 or 4), or int8
        `(..., Kp, Np)` for 8-bit containers.
      scales: float32 `(..., n_groups_padded, Np)`, or `(..., 1, 1)` for "tensor".
      zeros: bfloat16 zero points shaped like `scales` (asym only), else None.
      method, bits, granularity, group_size: the QuantSpec (static).
      shape: the unpadded `(in_features, out_features)` of one matrix (static).
      dtype: name of the dtype `unpack` returns, the latent kernel's (static).
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    method: str = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    granularity: str = struct.field(pytree_node=False)
    group_size: int | None = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.method, self.bits, self.granularity, self.group_size)

    @property
    def container_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def values_per_word(self) -> int:
        """Codes per stored element: 16 (2-bit), 8 (4-bit) or 1 (int8)."""
        c = self.container_bits
        return 1 if c == 8 else 32 // c

    @property
    def padded_shape(self) -> tuple[int, int]:
        return padded_shape(self.spec, self.shape)

    @property
    def offset(self) -> int:
        """Stored code minus integer value: `v = code - offset`."""
        return _offset(self.method, self.container_bits)

    @property
    def group_rows(self) -> int:
        """Padded kernel rows that share one row of `scales`."""
        if self.granularity == "group":
            return self.group_size
        return self.padded_shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (codes, scales, zeros), leading axes included."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))


def _offset(method: str, cbits: int) -> int:
    if method == "asym":
        return -128 if cbits == 8 else 0  # codes 0..255 stored as int8 code - 128
    return 0 if cbits == 8 else 2 ** (cbits - 1)  # signed levels stored as unsigned fields


def padded_shape(spec: QuantSpec, shape: tuple[int, int]) -> tuple[int, int]:
    """The padded `(Kp, Np)` that `pack` stores for an unpadded `(K, N)` matrix."""
    k, n = shape
    k_align = math.lcm(spec.group_size, _PACK_UNIT) if spec.granularity == "group" else K_ALIGN
    return _round_up(k, k_align), _round_up(n, N_ALIGN)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _levels_and_scales(
    w: jax.Array, spec: QuantSpec, scale: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    # The very grouping view and formulas of the fake-quantizer (`quantizers.quantize_levels`):
    # identical shapes give identical reductions, which is what makes unpack(pack(w))
    # bit-identical to fake_quantize(w).
    gamma = None
    if spec.method == "pact":  # the learned gamma, 1.0 by default as in fake_quantize
        if scale is None:
            scale = jnp.ones(quantizers.scale_shape(spec, w.shape), jnp.float32)
        gamma = quantizers.scale_to_groups(jnp.asarray(scale).astype(jnp.float32), spec, w.shape)
    return quantizers.quantize_levels(
        quantizers.to_groups(w.astype(jnp.float32), spec), spec, gamma
    )


def _squeeze_group_axis(stat: jax.Array) -> jax.Array:
    return stat[..., 0, :]  # (..., NG, 1, O) -> (..., NG, O)


def pack(
    w: Float[Array, "*lead n_in n_out"],
    spec: QuantSpec,
    scale: Float[Array, "..."] | None = None,
) -> PackedWeight:
    """Quantizes a latent kernel and packs it.

    Args:
      w: a kernel `(..., in_features, out_features)`; leading axes are independent matrices.
      spec: the quantizer (method, bits, granularity, group size).
      scale: PACT+'s learned gamma, shaped `quantizers.scale_shape(spec, w.shape)`; None means
        1.0, as in `fake_quantize`. Only allowed with method "pact".

    Returns:
      The PackedWeight; `unpack` of it equals `fake_quantize(w, spec, scale)` bit for bit (up to
      the sign of zeros: a stored 0 has none) when both are evaluated the same way, eagerly or
      each inside one jit. (Inside a jit XLA may rewrite a division by a broadcast scale into a
      multiplication by its reciprocal, so even fake_quantize differs by an ulp between eager
      and jitted evaluation for sym, PACT+ and per-tensor asym.)

    Raises:
      ValueError: the shape does not suit the spec, or a scale is given to a method without one.
    """
    quantizers.check_shape(spec, w.shape)
    if scale is not None and spec.method != "pact":
        raise ValueError(f"a scale is only learned by method 'pact', not {spec.method!r}")
    *lead, k, n = w.shape
    kp, np_ = padded_shape(spec, (k, n))
    cbits = container_bits(spec.bits)
    offset = _offset(spec.method, cbits)

    values, scales, zeros = _levels_and_scales(w, spec, scale)
    ints = values.astype(jnp.int32).reshape(*lead, k, n) + offset
    lead_pad = [(0, 0)] * len(lead)
    # Padded rows/columns hold the integer value 0 (the zero point's code for asym is unknown
    # there, but any finite weight is fine: padded activations are zero, padded outputs dropped).
    ints = jnp.pad(ints, [*lead_pad, (0, kp - k), (0, np_ - n)], constant_values=offset)

    scales = _squeeze_group_axis(scales)
    if spec.granularity == "tensor":
        scale_pad = [(0, 0), (0, 0)]
    else:
        rows = scales.shape[-2]
        padded_rows = kp // spec.group_size if spec.granularity == "group" else 1
        scale_pad = [(0, padded_rows - rows), (0, np_ - n)]
    scales = jnp.pad(scales, [*lead_pad, *scale_pad], constant_values=1.0)
    if zeros is not None:
        zeros = jnp.pad(_squeeze_group_axis(zeros), [*lead_pad, *scale_pad]).astype(jnp.bfloat16)

    if cbits == 8:
        codes = ints.astype(jnp.int8)
    else:
        per_word = 32 // cbits
        fields = ints.astype(jnp.uint32).reshape(*lead, kp // per_word, per_word, np_)
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * cbits
        shifts = shifts.reshape((1,) * (fields.ndim - 2) + (per_word, 1))
        # The fields occupy disjoint bits, so their sum is their bitwise OR.
        words = jnp.sum(fields << shifts, axis=-2, dtype=jnp.uint32)
        codes = jax.lax.bitcast_convert_type(words, jnp.int32)
    return PackedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        method=spec.method,
        bits=spec.bits,
        granularity=spec.granularity,
        group_size=spec.group_size,
        shape=(k, n),
        dtype=jnp.dtype(w.dtype).name,
    )


def unpack_ints(packed: PackedWeight) -> jax.Array:
    """The padded integer values `v` (int32, `(..., Kp, Np)`), before scales and zero points."""
    kp, np_ = packed.padded_shape
    lead = packed.codes.shape[:-2]
    if packed.container_bits == 8:
        ints = packed.codes.astype(jnp.int32)
    else:
        cbits, per_word = packed.container_bits, packed.values_per_word
        shifts = jnp.arange(per_word, dtype=jnp.int32) * cbits
        words = packed.codes[..., :, None, :]  # (..., Kp // P, 1, Np)
        shifts = shifts.reshape((1,) * (words.ndim - 2) + (per_word, 1))
        fields = jax.lax.shift_right_logical(words, shifts)
        ints = (fields & (2**cbits - 1)).reshape(*lead, kp, np_)
    return ints - packed.offset


def unpack(packed: PackedWeight) -> Float[Array, "*lead n_in n_out"]:
    """Dequantizes a PackedWeight to its float kernel (unpadded, in the latent kernel's dtype).

    Args:
      packed: from `pack`.

    Returns:
      `(..., in_features, out_features)`, bit-identical to `fake_quantize(w, spec)`.
    """
    k, n = packed.shape
    spec = packed.spec
    values = unpack_ints(packed)[..., :k, :n].astype(jnp.float32)
    values_NxGxO = quantizers.to_groups(values, spec)
    scales = _unpadded_stats(packed.scales, packed)
    zeros = None
    if packed.zeros is not None:
        zeros = _unpadded_stats(packed.zeros, packed).astype(jnp.float32)
    out = quantizers.dequantize_levels(values_NxGxO, scales, zeros, spec)
    return out.reshape(*values.shape).astype(packed.dtype)


def _unpadded_stats(stat: jax.Array, packed: PackedWeight) -> jax.Array:
    k, n = packed.shape
    if packed.granularity == "group":
        stat = stat[..., : k // packed.group_size, :n]
    elif packed.granularity == "channel":
        stat = stat[..., :n]
    return stat[..., :, None, :]  # the (..., NG, 1, O) statistic layout of quantizers.py


def kernel_multipliers(packed: PackedWeight) -> tuple[jax.Array, jax.Array | None]:
    """Per-group `(mult, zero)` with weight ~= `(v - zero) * mult`, for the matmul kernels.

    Exact for TWN, asym and 2-bit PACT+; sym and wider PACT+ divide in `unpack` and multiply by a
    reciprocal here, which differs from the division by at most one float32 rounding.

    Returns:
      float32 `mult` of shape `(..., n_groups_padded, Np)` (tensor scales broadcast over Np), and
      the float32 zero points of the same shape, or None.
    """
    np_ = packed.padded_shape[1]
    scales = packed.scales
    if packed.method == "sym":
        mult = 1.0 / scales
    elif packed.method == "pact":
        mult = scales / (2.0 ** (packed.bits - 1) - 1.0)
    else:
        mult = scales
    target = mult.shape[:-1] + (np_,)
    mult = jnp.broadcast_to(mult, target)
    zeros = None
    if packed.zeros is not None:
        zeros = jnp.broadcast_to(packed.zeros.astype(jnp.float32), target)
    return mult, zeros


def dense_nbytes(packed: PackedWeight, dtype=jnp.bfloat16) -> int:
    """Bytes of the same kernel stored densely in `dtype` (unpadded, leading axes included)."""
    lead = packed.codes.shape[:-2]
    k, n = packed.shape
    return int(np.prod(lead, dtype=np.int64)) * k * n * jnp.dtype(dtype).itemsize

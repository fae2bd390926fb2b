"""Weight-only quantized matmul on TPU: `x @ unpack(packed)` with 2/4/8-bit packed weights.

The Mosaic TPU counterpart of `pallas/quantized_matmul.py` (the Triton GPU kernel), over the same
`qtensor.PackedWeight` format and with the same `quantized_matmul_reference`. One launch shape:
grid `(M / bm, N / bn, K / bk)`, K last and sequential ("arbitrary"), a float32 accumulator in
VMEM scratch written out after the last K step; the M and N axes are "parallel" (megacore chips
split them between their cores).

Each K step reads a `(bk / P, bn)` tile of int32 words (P = 16 two-bit or 8 four-bit codes a word)
or a `(bk, bn)` int8 tile, and unpacks it on the vector unit with one shift and one mask per field:
field f of every word is one `(bk / P, bn)` slab, whole (8, 128) vregs, with no relayout. The
slabs are stacked along sublanes into a `(bk, bn)` weight tile whose rows come field-major (row
`f * bk / P + j` holds kernel row `P j + f` of the tile); x is permuted to that order once, in
the wrapper (`_field_major`), so one dot of the tile's full depth feeds the MXU. Codes become
floats through float32 (v5e has no bf16 vector unit), have their offset and zero point taken away
there, and are narrowed to the activations' dtype (exact: |v| <= 256), so bf16 inputs take the
MXU's bf16 path with float32 accumulation.

A K tile never crosses a scale group (`bk` divides the group's rows), so the scale multiplies the
tile's partial product, `acc += (x @ (v - zero)) * mult`, as in the GPU kernel. The tiles obey
Mosaic's layout rules: `bk` a multiple of 128 (x's lane axis; 128 rows are 8 sublanes of 2-bit
words), `bn` a multiple of 128 or all of N, `bm` a multiple of 16. A format whose K tiling admits
no such `bk` (groups of fewer than 128 rows, or a padded K that 128 does not divide) is refused
by `supports`, and the "auto" kernel choice then falls back to XLA's dequantize-then-dot on TPU
(`export.packed_matmul`). See docs/kernels.md.

`quantized_matmul` is a `jax.custom_vjp`: the gradient with respect to x is that of
`quantized_matmul_reference`; the packed weights get none.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas import quantized_matmul as _gpu
from tsld_jax.quant import qtensor
from tsld_jax.quant.qtensor import PackedWeight

# The one reference of the op, shared with the GPU kernel (same signature).
quantized_matmul_reference = _gpu.quantized_matmul_reference

_LANES = 128  # x's K tile is on the lane axis: a multiple of 128
_SUBLANES = 16  # rows of a bf16 vreg tile (8 for float32): M is padded to this
DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shape of one launch (hashable: a static argument).

    Attributes:
      block_m: activation rows per program, at most; lowered to M rounded up to 16.
      block_n: output columns per program; lowered to the largest multiple of 128 that divides
        the padded N (all of N where 128 does not divide it).
      block_k: K rows per grid step; lowered to the largest multiple of 128 that divides both
        the padded K and the scale group's rows.
    """

    block_m: int
    block_n: int
    block_k: int


# Launch defaults, checked by bench/kernels_static_tpu.py against libtpu's compiler for v5e and
# v6e (docs/kernels.md): no launch over 9 MiB of VMEM (16 MiB is Mosaic's default limit).
# Decode (M <= 64) is bound by unpacking on the vector unit (the compiled step bodies are ~85%
# VALU): large K tiles spread a grid step's fixed cost over more weights; a 2-bit tile of
# 2048 x 512 is 256 KiB of words.
DECODE = BlockSizes(block_m=DECODE_MAX_M, block_n=512, block_k=2048)
# Prefill: each unpacked weight tile feeds 1024 rows, so the MXU, not the unpacking, bounds a
# step on v5e (predicted 0.94x of XLA's bf16 dot for W2 at 4096^3; 256 rows: 0.70x).
PREFILL = BlockSizes(block_m=1024, block_n=512, block_k=512)


def select_block_sizes(m: int) -> BlockSizes:
    """`DECODE` up to `DECODE_MAX_M` activation rows, else `PREFILL`."""
    return DECODE if m <= DECODE_MAX_M else PREFILL


def _largest_multiple_dividing(n: int, unit: int, cap: int) -> int | None:
    """The largest multiple of `unit` that divides n and is at most cap; None if there is none."""
    for t in range(min(cap, n) // unit, 0, -1):
        if n % (t * unit) == 0:
            return t * unit
    return None


def _block_k(packed: PackedWeight, cap: int) -> int | None:
    """The K tile: a multiple of 128 rows that divides the padded K and either divides the scale
    group or is made of whole groups (of a multiple of 128 rows)."""
    kp, _ = packed.padded_shape
    group = packed.group_rows
    if group % _LANES:
        return None
    for t in range(min(cap, kp) // _LANES, 0, -1):
        bk = t * _LANES
        if kp % bk == 0 and (group % bk == 0 or bk % group == 0):
            return bk
    return None


def supports(packed: PackedWeight) -> bool:
    """Whether the kernel tiles this format: channel and tensor scales with a padded K that 128
    divides, or scale groups of a multiple of 128 rows."""
    return _block_k(packed, cap=max(packed.padded_shape[0], _LANES)) is not None


def _fit(blocks: BlockSizes, packed: PackedWeight, m: int) -> tuple[BlockSizes, int]:
    """Block sizes that tile the padded problem exactly; also returns the padded M."""
    kp, np_ = packed.padded_shape
    block_m = min(blocks.block_m, -(-m // _SUBLANES) * _SUBLANES)
    block_m = -(-block_m // _SUBLANES) * _SUBLANES
    block_n = _largest_multiple_dividing(np_, _LANES, blocks.block_n) or np_
    block_k = _block_k(packed, max(blocks.block_k, _LANES))
    if block_k is None:
        raise NotImplementedError(
            f"no K tile of a multiple of {_LANES} rows fits the padded K ({kp}) and the scale "
            f"group ({packed.group_rows} rows) of this {packed.bits}-bit format; use channel "
            'scales with K a multiple of 128, a group size that is one, or the kernel "xla"'
        )
    if block_k * 2 <= blocks.block_k and packed.values_per_word > 1:
        # K with few tile sizes (11008 = 2 x 43 x 128 tiles only by 256 below 5504): a longer
        # tile, up to four times the launch's, with fewer columns for the same weights a step,
        # rather than short steps whose fixed cost dominates. Not for int8 codes: bound by
        # their bytes, they lose more to re-reading x for the narrower column blocks
        # (docs/kernels.md).
        longer = _block_k_at_least(packed, blocks.block_k, 4 * blocks.block_k)
        if longer is not None:
            budget = max(_LANES, blocks.block_k * blocks.block_n // longer)
            narrow = _largest_multiple_dividing(np_, _LANES, budget)
            if narrow is not None:
                block_k, block_n = longer, narrow
    mp = -(-m // block_m) * block_m
    return BlockSizes(block_m, block_n, block_k), mp


def _block_k_at_least(packed: PackedWeight, low: int, high: int) -> int | None:
    """The shortest K tile of `_block_k`'s kind between low and high rows, if any."""
    kp, _ = packed.padded_shape
    group = packed.group_rows
    for bk in range(-(-low // _LANES) * _LANES, min(high, kp) + 1, _LANES):
        if kp % bk == 0 and (group % bk == 0 or bk % group == 0):
            return bk
    return None


def scoped_vmem_bytes(compiled_hlo: str) -> int:
    """VMEM bytes the compiled program reserves for its Mosaic kernels (the largest), read from
    the `used_scoped_memory_configs` of its custom calls (memory space 1 is VMEM); 0 if none."""
    sizes = re.findall(
        r'"used_scoped_memory_configs":\[[^\]]*?"memory_space":"1","offset":"\d+","size":"(\d+)"',
        compiled_hlo,
    )
    return max(map(int, sizes), default=0)


def _field_major(x_MxK: jax.Array, unit: int, per_word: int) -> jax.Array:
    """x with each unit's columns (a K tile, or one scale group of it) in the kernel's
    field-major order: column `f W + j` of a unit (W = unit / P word rows) holds its column
    `P j + f`."""
    if per_word == 1:
        return x_MxK
    m, kp = x_MxK.shape
    units = x_MxK.reshape(m, kp // unit, unit // per_word, per_word)
    return units.transpose(0, 1, 3, 2).reshape(m, kp)


def _kernel(
    x_ref,
    codes_ref,
    mult_ref,
    *rest,
    cbits: int,
    per_word: int,
    offset: int,
    has_zeros: bool,
    compute_dtype,
    unit: int,
):
    zeros_ref = rest[0] if has_zeros else None
    out_ref, acc_ref = rest[-2:]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # A K tile is one unit (channel/tensor scales, or part of a group) or several whole scale
    # groups: one dot per unit, scaled by its group's row.
    words = unit // per_word
    sum_MxN = None
    for q in range(x_ref.shape[1] // unit):
        words_WxN = codes_ref[q * words : (q + 1) * words, :]
        if per_word == 1:
            codes_KxN = words_WxN.astype(jnp.int32)
        else:
            # Field f of every word at once: a shift and a mask per field, whole vregs,
            # stacked field-major along sublanes (x's columns were permuted to match).
            # The top field needs no mask: the logical shift leaves only its bits.
            mask = 2**cbits - 1
            fields = [
                lax.shift_right_logical(words_WxN, cbits * f) if f else words_WxN
                for f in range(per_word)
            ]
            fields = [w if f == per_word - 1 else w & mask for f, w in enumerate(fields)]
            codes_KxN = jnp.concatenate(fields, axis=0)
        # Decode: the dot takes the stored codes as they are (exact in bf16) and the offset and
        # zero point come off afterwards, once per output rather than once per weight:
        # x @ (c - o - z) = x @ c - sum(x) (o + z). The vector unit bounds decoding, and this
        # saves it one of ~4.5 operations a weight; with many rows (prefill) the sums and the
        # correction cost more than they save (docs/kernels.md).
        fold = x_ref.shape[0] <= DECODE_MAX_M and (has_zeros or offset)
        zero_1xN = zeros_ref[q : q + 1, :] if has_zeros else 0.0
        values_KxN = codes_KxN.astype(jnp.float32)
        if not fold:
            values_KxN = values_KxN - (zero_1xN + offset)
        w_KxN = values_KxN.astype(compute_dtype)
        x_MxK = x_ref[:, q * unit : (q + 1) * unit].astype(compute_dtype)
        partial_MxN = jnp.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)
        if fold:
            xsum_Mx1 = jnp.sum(x_MxK.astype(jnp.float32), axis=1, keepdims=True)
            partial_MxN = partial_MxN - xsum_Mx1 * (zero_1xN + offset)
        partial_MxN = partial_MxN * mult_ref[q : q + 1, :]
        sum_MxN = partial_MxN if sum_MxN is None else sum_MxN + partial_MxN
    acc_ref[...] += sum_MxN

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _compute_dtype(dtype) -> jnp.dtype:
    # Small integers are exact in bf16, so bf16 activations keep the MXU's bf16 path; f16 (which
    # the TPU's MXU does not take) and f32 multiply in float32.
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def _matmul_2d(x_MxK: jax.Array, packed: PackedWeight, interpret: bool, blocks: BlockSizes):
    m, k = x_MxK.shape
    kp, np_ = packed.padded_shape
    blocks, mp = _fit(blocks, packed, m)
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    per_word = packed.values_per_word
    x_MxK = jnp.pad(x_MxK, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x_MxK
    unit = min(bk, packed.group_rows)
    x_MxK = _field_major(x_MxK, unit, per_word)
    mult, zeros = qtensor.kernel_multipliers(packed)
    # The scale rows of a K step (one, or the tile's whole groups): as (groups / per_tile,
    # per_tile, N), a block's last two dims are (per_tile, bn), legal for Mosaic because
    # per_tile is that axis' whole extent.
    groups = mult.shape[0]
    per_tile = bk // unit

    def scale_map(i, j, s):
        return ((s * bk) // (per_tile * packed.group_rows), 0, j)

    words = bk // per_word
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, s: (i, s)),
        pl.BlockSpec((words, bn), lambda i, j, s: (s, j)),
        pl.BlockSpec((_gpu._SQUEEZED, per_tile, bn), scale_map),
    ]
    args = [x_MxK, packed.codes, mult.reshape(groups // per_tile, per_tile, np_)]
    if zeros is not None:
        in_specs.append(pl.BlockSpec((_gpu._SQUEEZED, per_tile, bn), scale_map))
        args.append(zeros.reshape(groups // per_tile, per_tile, np_))
    kernel = functools.partial(
        _kernel,
        cbits=packed.container_bits,
        per_word=per_word,
        offset=packed.offset,
        has_zeros=zeros is not None,
        compute_dtype=_compute_dtype(x_MxK.dtype),
        unit=unit,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x_MxK.dtype),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=f"quantized_matmul_tpu_w{packed.bits}",
    )(*args)
    return out[:m, : packed.shape[1]]


_quantized_matmul = _gpu.with_reference_gradient(
    _matmul_2d, lambda x_MxK: select_block_sizes(x_MxK.shape[0])
)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def quantized_matmul(
    x: Float[Array, "*lead k"],
    packed: PackedWeight,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "*lead n"]:
    """`x @ unpack(packed)` with the packed weights unpacked on the fly, in a Pallas TPU kernel.

    Args:
      x: activations `(..., in_features)`, bfloat16, float16 or float32.
      packed: one quantized matrix (`qtensor.pack` of an `(in_features, out_features)` kernel)
        whose format the kernel tiles (`supports`).
      interpret: run the kernel in Pallas interpret mode (CPU, tests).
      block_sizes: the launch; None picks `DECODE` or `PREFILL` from the number of rows of x.
        Sizes are lowered to fit the padded shape (see `BlockSizes`).

    Returns:
      `(..., out_features)` in x's dtype: the product with float32 accumulation, weights
      dequantized into bf16 for bf16 inputs (float32 otherwise) and scaled per K tile.

    Raises:
      ValueError: x does not match the packed shape, or packed holds stacked matrices.
      NotImplementedError: the format's K tiling admits no K tile (`supports` is False).
    """
    _gpu._check(x, packed)
    return _quantized_matmul(x, packed, interpret, block_sizes)

"""Weight-only quantized matmul: `x @ unpack(packed)` with 2/4/8-bit packed weights, in Pallas.

One portable kernel body (the Pallas Triton lowering: `pl.pallas_call` with BlockSpecs and plain
jnp ops, so it runs on A100 and H100 alike and in interpret mode on the CPU), launched in two
shapes chosen by the number of activation rows M:

- decode (M <= `DECODE_MAX_M`, `DECODE` and `DECODE_WIDE`): memory-bound. One program owns a
  (16..64, block_n) output tile (all of M: the weights are read once) and a slice of K
  ("split-K", so a single token still fills the GPU with programs); it streams the packed int32
  words of its slice once, unpacks them in registers and multiplies on the matrix units (a
  16-row dot costs nothing next to reading the weights). The partial sums of the K slices are
  added by XLA afterwards (float32, `k_splits * M * N` values).
- prefill (larger M): compute-bound. 128x128 output tiles, the whole of K per program, each
  K tile of weights dequantized once into the activations' dtype (bf16 for bf16 inputs) and fed
  to the tensor cores; float32 accumulation.

In both, a K tile never crosses a scale group (`block_k` divides the group size), so scales are
applied to the tile's partial product, `acc += (x @ (v - zero)) * mult`, rather than to every
weight: unpacking costs a shift, a mask, an OR, a subtraction and a narrowing to bf16 per weight,
on small integers that the activations' dtype represents exactly (no int-to-float conversion
instruction, which runs at a quarter rate). See docs/kernels.md for the layout and
the block-size reasoning.

`quantized_matmul` is a `jax.custom_vjp`: the gradient with respect to x is that of
`quantized_matmul_reference` (dequantize, then XLA's dot); the packed weights get none.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas import targets
from tsld_jax.quant import qtensor
from tsld_jax.quant.qtensor import PackedWeight

try:  # The Triton compiler parameters moved between jax releases; all are optional.
    from jax.experimental.pallas import triton as _pallas_triton

    _TritonParams = getattr(_pallas_triton, "CompilerParams", None) or getattr(
        _pallas_triton, "TritonCompilerParams", None
    )
except ImportError:  # pragma: no cover - a jax without the Triton lowering
    _TritonParams = None

# A block dimension of size 1 that the kernel does not see (`None` in older jax releases).
_SQUEEZED = getattr(pl, "squeezed", None)
DECODE_MAX_M = 64
_MAGIC = 8388608.0  # 2^23: float32 integers from 2^23 to 2^24 have unit spacing
_MAGIC_BITS = 0x4B000000  # its bit pattern
# Programs a decode launch aims for: about two per SM of an H100 (132 SMs) or A100 (108).
_TARGET_PROGRAMS = 264
# 8-bit codes take a byte per weight in shared memory, four times the 2-bit words: their K
# tile is capped here so that the pipeline stages fit an A100's 163 KB.
_INT8_MAX_BLOCK_K = 128
# K loops of at least this many steps keep a constant trip count (see `_kernel`).
_CONSTANT_TRIP_COUNT = 16
# The smallest K tile `_fit` halves a tile to (2-bit codes unpack in pairs from 128 rows up).
_MIN_SPLIT_BLOCK_K = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch parameters of one kernel launch (hashable: a static argument).

    Attributes:
      block_m: activation rows per program, at most; lowered to the next power of two of M
        (at least 16, the smallest tile of the matrix units).
      block_n: output columns per program.
      block_k: K rows per step of a program's loop; lowered to the largest power of two that
        divides the padded K and the scale group, and is a multiple of the packing.
      k_splits: programs sharing one output tile along K (partial sums added afterwards); 0
        picks enough to give about `_TARGET_PROGRAMS` programs. Splits need not divide the
        K tile count: each takes ceil(tiles / splits) tiles, and the steps past the last
        tile read zero activations.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
      pairs: unpack 2- and 4-bit codes two per 32-bit operation into 16-bit floats
        (`_paired_fields_dot`) where the activations are bf16/f16 and block_k >= 8 x values
        per word; False expands the words into float32 rows first (the first kernel's way).
    """

    block_m: int
    block_n: int
    block_k: int
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pairs: bool = True


# Launch defaults, checked by bench/kernels_static.py against the sm_80/sm_90 compilers: no spills,
# shared memory within an A100's 163 KB and an H100's 227 KB (docs/kernels.md). Decode: 4 warps
# and 512-row K tiles give each thread 256 weights a tile, over which the loop's fixed costs
# (addresses, barriers) spread thin (W2's instructions a weight: docs/kernels_static.json).
DECODE = BlockSizes(block_m=16, block_n=128, block_k=512, k_splits=0, num_warps=4, num_stages=4)
# 17..64 rows: one 64-row tile (weights still read once); half the K tile and two stages,
# since the activation tile and the accumulators grow fourfold (with three, the 8-bit launch
# spilled 64 bytes on sm_80).
DECODE_WIDE = BlockSizes(
    block_m=64, block_n=128, block_k=256, k_splits=0, num_warps=4, num_stages=2
)
# Prefill dequantizes each weight tile once into shared memory for the tensor cores. On sm_90
# (wgmma reads its weight operand from shared memory) the paired unpacking of 128-row tiles is
# the cheaper; on sm_80 (mma operands in registers: each of the warps along M unpacks the tile
# again) the expanded 64-row tiles are, and keep the tensor cores the bound (docs/kernels.md).
PREFILL = BlockSizes(block_m=128, block_n=128, block_k=128, k_splits=1, num_warps=8, num_stages=3)
PREFILL_SM80 = dataclasses.replace(PREFILL, block_k=64, pairs=False)
# Float32 activations (expanded rows: twice the shared memory per element, and no paired
# unpacking): the first kernel's launches with half its K tiles, which fit an A100's 163 KB.
DECODE_F32 = BlockSizes(block_m=16, block_n=128, block_k=128, k_splits=0, num_warps=8, num_stages=4)
DECODE_WIDE_F32 = dataclasses.replace(DECODE_F32, block_m=64, block_k=64, num_stages=3)
PREFILL_F32 = dataclasses.replace(PREFILL_SM80, block_k=32)


def _pow2_at_most(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def _largest_pow2_divisor_at_most(n: int, cap: int) -> int:
    d = _pow2_at_most(cap)
    while d > 1 and n % d:
        d //= 2
    return d


def _fit(blocks: BlockSizes, packed: PackedWeight, m: int) -> tuple[BlockSizes, int]:
    """Block sizes that tile the padded problem exactly; also returns the padded M."""
    kp, np_ = packed.padded_shape
    per_word = packed.values_per_word
    block_m = min(blocks.block_m, max(16, 1 << max(m - 1, 0).bit_length()))
    block_n = _largest_pow2_divisor_at_most(np_, blocks.block_n)
    cap = min(blocks.block_k, _INT8_MAX_BLOCK_K) if per_word == 1 else blocks.block_k
    block_k = _largest_pow2_divisor_at_most(math.gcd(kp, packed.group_rows), cap)
    if block_k % per_word:
        raise NotImplementedError(
            f"no K tile fits a {packed.container_bits}-bit packing ({per_word} values per word) "
            f"with group size {packed.group_size}; use a group size that is a multiple of "
            f"{per_word}"
        )
    mp = -(-m // block_m) * block_m
    tiles = (mp // block_m) * (np_ // block_n)
    wanted = blocks.k_splits if blocks.k_splits > 0 else max(1, -(-_TARGET_PROGRAMS // tiles))

    def split(k_tiles: int) -> tuple[int, int]:  # (splits, steps per split)
        if blocks.k_splits > 0:
            splits = min(wanted, k_tiles)
        else:
            # Between half and all of the wanted splits, the one that runs the fewest idle
            # steps past the last tile (then the most): LLaMA's K = 11008 (43 tiles of 256, a
            # prime count) splits 9 ways in 5 tiles (2 idle steps of 45) rather than not at
            # all; 32 tiles with 5 wanted split 4 ways in 8, not 5 ways in 7 (3 idle).
            most = min(wanted, k_tiles)
            candidates = range(max(1, min(-(-wanted // 2), most)), most + 1)
            splits = min(candidates, key=lambda s: (s * -(-k_tiles // s) - k_tiles, -s))
        return splits, -(-k_tiles // splits)

    splits, steps = split(kp // block_k)
    # A program of one K step has no loop to overlap loads with: halve the tile while that
    # gives two (K = 4096 in decode: 8 splits of one 512-row tile -> of two 256-row tiles).
    while steps < 2 and block_k // 2 >= _MIN_SPLIT_BLOCK_K and (block_k // 2) % per_word == 0:
        block_k //= 2
        splits, steps = split(kp // block_k)
    fitted = dataclasses.replace(
        blocks, block_m=block_m, block_n=block_n, block_k=block_k, k_splits=splits
    )
    return fitted, mp


def _kernel(
    x_ref,
    codes_ref,
    mult_ref,
    *rest,
    cbits: int,
    per_word: int,
    offset: int,
    has_zeros: bool,
    block_k: int,
    k_steps: int,
    k_tiles: int,
    group_rows: int,
    compute_dtype,
    pairs: bool,
    one_group: bool,
):
    rest = list(rest)
    sums_ref = rest.pop(0) if pairs else None
    zeros_ref = rest.pop(0) if has_zeros else None
    steps_ref = rest.pop(0) if k_steps < _CONSTANT_TRIP_COUNT else None
    (out_ref,) = rest
    block_m = x_ref.shape[0]
    block_n = codes_ref.shape[-1]
    first_step = pl.program_id(2) * k_steps
    # Splits need not divide the K tiles: the last one then starts early, at k_tiles - k_steps,
    # and its x holds zeros for the tiles it shares with the one before (`_split_layout`).
    first_tile = jnp.minimum(first_step, k_tiles - k_steps)
    words_per_tile = block_k // per_word
    # Codes become floats without an int-to-float conversion (a quarter-rate instruction that
    # would bound decoding): OR-ing a non-negative integer u < 2^23 into the mantissa of 2^23
    # gives the float 2^23 + u exactly, and one subtraction of 2^23 + base (+ the zero point)
    # leaves the integer value, exact in float32 and then in the activations' dtype.
    base = offset if per_word > 1 else offset + 128

    def step(i, carry):
        acc_MxN, xsum_Mx1 = carry
        kx = first_step + i  # this step's K tile in x's layout (`_split_layout`)
        kk = first_tile + i  # and in the weights'
        if pairs and one_group:  # the scale and the offset are applied once, after the loop
            acc_MxN = _paired_fields_dot(
                acc_MxN, x_ref, codes_ref, kx, kk, cbits, per_word, block_k, compute_dtype
            )
            return acc_MxN, xsum_Mx1 + sums_ref[:, pl.ds(kx, 1)]
        group = (kk * block_k) // group_rows
        mult_1xN = mult_ref[pl.ds(group, 1), :]
        zero_1xN = zeros_ref[pl.ds(group, 1), :] if has_zeros else 0.0
        if pairs:
            partial_MxN = _paired_fields_dot(
                jnp.zeros_like(acc_MxN), x_ref, codes_ref, kx, kk, cbits, per_word, block_k,
                compute_dtype,
            )  # fmt: skip
            xsum_tile_Mx1 = sums_ref[:, pl.ds(kx, 1)]
            return acc_MxN + unbias(partial_MxN, xsum_tile_Mx1, mult_1xN, zero_1xN), xsum_Mx1
        x_MxK = x_ref[:, pl.ds(kx * block_k, block_k)].astype(compute_dtype)
        if per_word == 1:
            unsigned_KxN = codes_ref[pl.ds(kk * block_k, block_k), :].astype(jnp.int32) + 128
        else:
            # Row k of the tile is field k % P of word row k // P: expand the words in registers.
            words_WxN = codes_ref[pl.ds(kk * words_per_tile, words_per_tile), :]
            shift_1xPx1 = lax.broadcasted_iota(jnp.int32, (1, per_word, 1), 1) * cbits
            fields_WxPxN = lax.shift_right_logical(words_WxN[:, None, :], shift_1xPx1)
            unsigned_KxN = (fields_WxPxN & (2**cbits - 1)).reshape(block_k, block_n)
        magic_KxN = lax.bitcast_convert_type(unsigned_KxN | _MAGIC_BITS, jnp.float32)
        w_KxN = (magic_KxN - (zero_1xN + (_MAGIC + base))).astype(compute_dtype)
        partial_MxN = jnp.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)
        return acc_MxN + partial_MxN * mult_1xN, xsum_Mx1

    def unbias(raw_MxN, xsum_Mx1, mult_1xN, zero_1xN):
        # The dots saw 1 + u / 2^c for code u: rescale, and take away x's sums times the
        # offset the values carried (1 + (base + zero) / 2^c), per row and column.
        shift_1xN = 1.0 + (zero_1xN + base) * (0.5**cbits)
        return (raw_MxN - xsum_Mx1 * shift_1xN) * (mult_1xN * 2.0**cbits)

    carry = (jnp.zeros((block_m, block_n), jnp.float32), jnp.zeros((block_m, 1), jnp.float32))
    # A short loop's trip count (k_steps) comes in as data so that the compiler cannot see it:
    # LLVM unrolls a loop of a few known steps fully, which undoes Triton's software
    # pipelining and, with a 64-row tile on sm_80, ran out of registers (160 bytes of spills,
    # bench/kernels_static.py). Long loops keep the constant: its addressing is cheaper
    # (the predicted prefill times: docs/kernels.md).
    trip_count = steps_ref[0] if steps_ref is not None else k_steps
    acc_MxN, xsum_Mx1 = lax.fori_loop(0, trip_count, step, carry)
    if pairs and one_group:
        group = (first_tile * block_k) // group_rows
        zero_1xN = zeros_ref[pl.ds(group, 1), :] if has_zeros else 0.0
        acc_MxN = unbias(acc_MxN, xsum_Mx1, mult_ref[pl.ds(group, 1), :], zero_1xN)
    out_ref[...] = acc_MxN.astype(out_ref.dtype)


# 16-bit floats: mantissa bits, and the bit pattern of 1.0.
_HALF_FORMATS = {jnp.dtype(jnp.bfloat16): (7, 0x3F80), jnp.dtype(jnp.float16): (10, 0x3C00)}
# A dot covers at least this many K rows (mma k16 for 16-bit operands).
_MIN_DOT_K = 16


def _paired_fields_dot(acc_MxN, x_ref, codes_ref, kx, kk, cbits, per_word, block_k, dtype):
    """`acc + x_tile @ (1 + U / 2^c)`: x's K tile kx, the codes U of K tile kk, two codes per
    32-bit operation (the dots add into acc, which Triton folds into the matrix unit's
    accumulator).

    Field f and field f + P/2 of a word sit 16 bits apart, in its two halves. One shift puts
    both at the top of a 16-bit float's mantissa and one AND-OR (a LOP3) sets their exponent:
    the word is then two 16-bit floats 1 + u / 2^c, exactly (u < 2^c), and is already the
    pair of K-adjacent operands one register of the matrix unit takes. Pair g of the tile's
    word rows is the `(2W, N)` operand with rows `2j, 2j + 1` = fields g, g + P/2 of word row
    j; x comes with its tile's columns in that order (`_paired_order`), one dot per pair.
    """
    mantissa_bits, one_bits = _HALF_FORMATS[jnp.dtype(dtype)]
    low = mantissa_bits - cbits  # where a code's lowest bit goes
    mask = ((2**cbits - 1) << low) * 0x10001
    one = one_bits * 0x10001
    words = block_k // per_word
    words_WxN = codes_ref[pl.ds(kk * words, words), :]
    for g in range(per_word // 2):
        move = cbits * g - low
        if move > 0:
            moved_WxN = lax.shift_right_logical(words_WxN, move)
        elif move < 0:
            moved_WxN = lax.shift_left(words_WxN, -move)
        else:
            moved_WxN = words_WxN
        halves_WxN = (moved_WxN & mask) | one
        lo_WxN = lax.bitcast_convert_type(halves_WxN.astype(jnp.int16), dtype)
        hi_WxN = lax.bitcast_convert_type(
            lax.shift_right_logical(halves_WxN, 16).astype(jnp.int16), dtype
        )
        w_2WxN = jnp.stack([lo_WxN, hi_WxN], axis=-1).transpose(0, 2, 1)
        w_2WxN = w_2WxN.reshape(2 * words, w_2WxN.shape[-1])
        x_Mx2W = x_ref[:, pl.ds(kx * block_k + g * 2 * words, 2 * words)].astype(dtype)
        acc_MxN = acc_MxN + jnp.dot(x_Mx2W, w_2WxN, preferred_element_type=jnp.float32)
    return acc_MxN


def _pairs_apply(blocks: BlockSizes, packed: PackedWeight, dtype) -> bool:
    """Whether a fitted launch unpacks codes in pairs (`_paired_fields_dot`): 2-/4-bit codes,
    16-bit activations, and a K tile whose per-pair dots still cover 16 rows (mma k16)."""
    per_word = packed.values_per_word
    return (
        blocks.pairs
        and per_word > 1
        and jnp.dtype(_compute_dtype(dtype)) in _HALF_FORMATS
        and 2 * blocks.block_k // per_word >= _MIN_DOT_K
    )


def _split_layout(x_MxK: jax.Array, block_k: int, k_steps: int, splits: int) -> jax.Array:
    """x laid out as `splits` runs of `k_steps` K tiles: where the splits overrun the K tiles,
    the last run starts with zero tiles (its program reads those tiles' weights, which the run
    before it has already added)."""
    overrun = (splits * k_steps - x_MxK.shape[1] // block_k) * block_k
    if not overrun:
        return x_MxK
    last = (splits - 1) * k_steps * block_k
    zeros = jnp.zeros((x_MxK.shape[0], overrun), x_MxK.dtype)
    return jnp.concatenate([x_MxK[:, :last], zeros, x_MxK[:, last:]], axis=1)


def _paired_order(x_MxK: jax.Array, block_k: int, per_word: int) -> jax.Array:
    """x with each K tile's columns in the order `_paired_fields_dot` takes them: column
    `2 W g + 2 j + h` of a tile (W word rows) holds its column `P j + g + h P / 2`."""
    m, kp = x_MxK.shape
    w = block_k // per_word
    tiles = x_MxK.reshape(m, kp // block_k, w, 2, per_word // 2)
    return tiles.transpose(0, 1, 4, 2, 3).reshape(m, kp)


def _compute_dtype(dtype) -> jnp.dtype:
    # Small integers (|v| <= 256) are exact in bf16/f16, so dequantized tiles take the
    # activations' format and the dot runs on the tensor cores; float32 stays float32.
    return jnp.dtype(dtype) if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else jnp.float32


def _matmul_2d(x_MxK: jax.Array, packed: PackedWeight, interpret: bool, blocks: BlockSizes):
    m, k = x_MxK.shape
    kp, np_ = packed.padded_shape
    blocks, mp = _fit(blocks, packed, m)
    bm, bn, bk, splits = blocks.block_m, blocks.block_n, blocks.block_k, blocks.k_splits
    k_tiles = kp // bk
    k_steps = -(-k_tiles // splits)
    kx = splits * k_steps * bk  # x's K in the split layout: whole steps for every split
    x_MxK = jnp.pad(x_MxK, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x_MxK
    x_MxK = _split_layout(x_MxK, bk, k_steps, splits)
    mult, zeros = qtensor.kernel_multipliers(packed)
    words = packed.codes.shape[0]
    groups = mult.shape[0]
    per_word = packed.values_per_word
    pairs = _pairs_apply(blocks, packed, x_MxK.dtype)

    in_specs = [
        pl.BlockSpec((bm, kx), lambda i, j, s: (i, 0)),
        pl.BlockSpec((words, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)),
    ]
    args = [x_MxK, packed.codes, mult]
    if pairs:
        sums = x_MxK.astype(jnp.float32).reshape(mp, kx // bk, bk).sum(axis=-1)
        args = [_paired_order(x_MxK, bk, per_word), packed.codes, mult, sums]
        in_specs.append(pl.BlockSpec((bm, kx // bk), lambda i, j, s: (i, 0)))
    if zeros is not None:
        in_specs.append(pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)))
        args.append(zeros)
    if k_steps < _CONSTANT_TRIP_COUNT:  # the trip count, as data (see _kernel)
        in_specs.append(pl.BlockSpec((1,), lambda i, j, s: (0,)))
        args.append(jnp.full((1,), k_steps, jnp.int32))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((mp, np_), x_MxK.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32)
        out_spec = pl.BlockSpec((_SQUEEZED, bm, bn), lambda i, j, s: (s, i, j))
    kernel = functools.partial(
        _kernel,
        cbits=packed.container_bits,
        per_word=packed.values_per_word,
        offset=packed.offset,
        has_zeros=zeros is not None,
        block_k=bk,
        k_steps=k_steps,
        k_tiles=k_tiles,
        group_rows=packed.group_rows,
        compute_dtype=_compute_dtype(x_MxK.dtype),
        pairs=pairs,
        # Each program's K range lies in one scale group (channel and tensor scales always;
        # group scales when the splits are whole groups and the last does not start early).
        one_group=groups == 1 or (packed.group_rows % (k_steps * bk) == 0 and kx == kp),
    )
    compiler_params = None
    if _TritonParams is not None and not interpret:
        compiler_params = _TritonParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, np_ // bn, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"quantized_matmul_w{packed.bits}",
    )(*args)
    if splits > 1:
        out = jnp.sum(out, axis=0).astype(x_MxK.dtype)
    return out[:m, : packed.shape[1]]


def _check(x: jax.Array, packed: PackedWeight) -> None:
    if packed.codes.ndim != 2:
        raise ValueError(
            f"quantized_matmul takes one matrix; got codes of shape {packed.codes.shape} "
            "(slice stacked layers first, e.g. inside lax.scan)"
        )
    if x.shape[-1] != packed.shape[0]:
        raise ValueError(
            f"x has {x.shape[-1]} features but the packed weight expects {packed.shape[0]}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")


def select_block_sizes(m: int, dtype=jnp.bfloat16, arch: int | None = None) -> BlockSizes:
    """The default launch for M activation rows of `dtype` on GPU architecture `arch`.

    `DECODE` up to 16 rows, `DECODE_WIDE` up to `DECODE_MAX_M`, else `PREFILL` (`PREFILL_SM80`
    before sm_90); float32 activations take the `*_F32` launches. `arch` None: the target of
    the trace (`targets.current_arch`).
    """
    wide = jnp.dtype(dtype).itemsize > 2
    if m <= DECODE.block_m:
        return DECODE_F32 if wide else DECODE
    if m <= DECODE_MAX_M:
        return DECODE_WIDE_F32 if wide else DECODE_WIDE
    if wide:
        return PREFILL_F32
    return PREFILL if (arch or targets.current_arch()) >= 90 else PREFILL_SM80


def with_reference_gradient(matmul_2d, select_block_sizes):
    """`f(x, packed, interpret, block_sizes)`: the kernel `matmul_2d(x_MxK, packed, interpret,
    blocks)` over x's leading axes, launched with `block_sizes` or `select_block_sizes(x_MxK)`,
    whose gradient with respect to x is `quantized_matmul_reference`'s (a Pallas call has no
    derivative; the packed codes and scales get none). One wrapper for the GPU and TPU kernels.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def matmul(x, packed, interpret, block_sizes):
        x_MxK = x.reshape(-1, x.shape[-1])
        blocks = block_sizes or select_block_sizes(x_MxK)
        out = matmul_2d(x_MxK, packed, interpret, blocks)
        return out.reshape(*x.shape[:-1], packed.shape[1])

    def forward(x, packed, interpret, block_sizes):
        return matmul(x, packed, interpret, block_sizes), (x, packed)

    def backward(interpret, block_sizes, residuals, dy):
        del interpret, block_sizes
        x, packed = residuals
        _, vjp = jax.vjp(lambda x: quantized_matmul_reference(x, packed), x)
        (dx,) = vjp(dy)
        return dx, None  # no gradient for the packed integer codes and their scales

    matmul.defvjp(forward, backward)
    return matmul


_quantized_matmul = with_reference_gradient(
    _matmul_2d, lambda x_MxK: select_block_sizes(x_MxK.shape[0], x_MxK.dtype)
)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def quantized_matmul(
    x: Float[Array, "*lead k"],
    packed: PackedWeight,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "*lead n"]:
    """`x @ unpack(packed)` with the packed weights unpacked on the fly, in a Pallas kernel.

    Args:
      x: activations `(..., in_features)`, bfloat16, float16 or float32.
      packed: one quantized matrix (`qtensor.pack` of an `(in_features, out_features)` kernel).
      interpret: run the kernel in Pallas interpret mode (CPU, tests).
      block_sizes: the launch; None picks `DECODE` or `PREFILL` from the number of rows of x.
        Sizes are lowered to fit the padded shape (see `BlockSizes`).

    Returns:
      `(..., out_features)` in x's dtype: the product with float32 accumulation. Weights are
      dequantized into x's dtype (bf16 inputs: `unpack(packed).astype(bf16)` up to the
      rounding of the per-group scale, which is applied to the float32 partial products).
      Float32 inputs use the dot's default precision, like `jnp.dot`: TF32 on recent GPUs.

    Raises:
      ValueError: x does not match the packed shape, or packed holds stacked matrices.
      NotImplementedError: no K tile fits the packing and the group size.
    """
    _check(x, packed)
    return _quantized_matmul(x, packed, interpret, block_sizes)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def quantized_matmul_reference(
    x: Float[Array, "*lead k"],
    packed: PackedWeight,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "*lead n"]:
    """Pure-jnp `x @ unpack(packed).astype(x.dtype)`, float32 accumulation, result in x's dtype.

    Args:
      x: activations `(..., in_features)`.
      packed: one quantized matrix (leading axes are not allowed).
      interpret: unused; the signature matches `quantized_matmul`.
      block_sizes: unused; the signature matches `quantized_matmul`.

    Returns:
      `(..., out_features)` in x's dtype.
    """
    del interpret, block_sizes
    _check(x, packed)
    w_KxN = qtensor.unpack(packed).astype(x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w_KxN, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)

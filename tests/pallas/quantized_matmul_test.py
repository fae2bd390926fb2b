"""quantized_matmul == x @ unpack(packed), decode and prefill launches, f32 and bf16, and its grad.

The kernels run natively on a GPU and in Pallas interpret mode elsewhere (CPU CI).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import quantized_matmul as qmm
from pallas import targets
from tsld_jax.quant import qtensor
from tsld_jax.quant.quantizers import QuantSpec

INTERPRET = jax.default_backend() != "gpu"
# What users run: on a GPU, float32 dots at the default precision (conftest pins float32 for
# tests that compare with float32 references; these derive their tolerance from TF32 instead).
pytestmark = pytest.mark.tf32
# Eager dispatch would compile every op of pack/unpack for every shape; jit compiles once.
_pack = jax.jit(qtensor.pack, static_argnums=(1,))
_unpack = jax.jit(qtensor.unpack)
# ||out - ref|| / ||ref|| bounds: float32 arithmetic (on a GPU a float32 dot at default
# precision runs on the tensor cores in TF32, as jnp.dot does there), and bf16 operands/output.
TOLERANCE = {jnp.float32: 1e-5 if INTERPRET else 2e-3, jnp.bfloat16: 1e-2}

TWN = QuantSpec("twn", 2, "channel")
ASYM4 = QuantSpec("asym", 4, "group", 32)
SYM8 = QuantSpec("sym", 8, "channel")

# (spec, x shape, K, N): decode (M <= 64) and prefill (M > 64) rows; ragged K and N throughout.
CASES = [
    (TWN, (1, 200), 200, 72),
    (TWN, (2, 3, 96), 96, 136),
    (TWN, (130, 160), 160, 100),
    (ASYM4, (1, 192), 192, 70),
    (ASYM4, (150, 128), 128, 130),
    (SYM8, (5, 72), 72, 64),
    (SYM8, (100, 64), 64, 200),
    (QuantSpec("twn", 2, "tensor"), (4, 112), 112, 48),
    (QuantSpec("twn", 2, "group", 64), (70, 128), 128, 64),
    (QuantSpec("sym", 4, "group", 16), (3, 48), 48, 40),
]


def _abstract(shape, spec):
    """A PackedWeight of ShapeDtypeStructs: enough for block fitting and lowering."""
    return jax.eval_shape(lambda w: qtensor.pack(w, spec), jax.ShapeDtypeStruct(shape, jnp.float32))


def _ids(case):
    spec, x_shape, k, n = case
    return f"{spec.method}{spec.bits}-{spec.granularity}-x{'x'.join(map(str, x_shape))}-n{n}"


def _problem(spec, x_shape, k, n, dtype, seed):
    # Fresh, non-zero random inputs for every case (zeros hide unwritten or misindexed outputs).
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)) * rng.uniform(0.5, 2.0, size=(n,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=x_shape) + 0.1, dtype)
    return x, _pack(w, spec)


def _relative(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _relative_error(out, x, packed):
    ref = np.asarray(x, np.float64) @ np.asarray(_unpack(packed), np.float64)
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape and np.isfinite(out).all()
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_dense_product(case, dtype):
    spec, x_shape, k, n = case
    x, packed = _problem(spec, x_shape, k, n, dtype, seed=hash((_ids(case), str(dtype))) % 2**31)
    out = qmm.quantized_matmul(x, packed, interpret=INTERPRET)
    assert out.dtype == dtype and out.shape == (*x_shape[:-1], n)
    assert _relative_error(out, x, packed) < TOLERANCE[dtype]
    ref = qmm.quantized_matmul_reference(x, packed)
    assert ref.dtype == dtype
    assert _relative_error(ref, x, packed) < TOLERANCE[dtype]


def test_split_k():
    # Small tiles force several K splits (partial sums added afterwards) and several N blocks.
    blocks = qmm.BlockSizes(block_m=16, block_n=64, block_k=32, k_splits=0)
    fitted, _ = qmm._fit(blocks, _abstract((256, 128), TWN), 1)
    assert fitted.k_splits == 8
    for spec in (TWN, ASYM4, SYM8):
        x, packed = _problem(spec, (3, 256), 256, 128, jnp.float32, seed=hash(spec) % 1000)
        out = qmm.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=blocks)
        assert _relative_error(out, x, packed) < TOLERANCE[jnp.float32]
    # One split of 16 steps: a loop long enough to keep its constant trip count.
    long = dataclasses.replace(blocks, k_splits=1)
    x, packed = _problem(TWN, (3, 512), 512, 128, jnp.bfloat16, seed=5)
    assert 512 // qmm._fit(long, packed, 3)[0].block_k == qmm._CONSTANT_TRIP_COUNT
    out = qmm.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=long)
    assert _relative_error(out, x, packed) < TOLERANCE[jnp.bfloat16]


def test_dispatch_by_rows():
    assert qmm.select_block_sizes(1) is qmm.DECODE
    assert qmm.select_block_sizes(16) is qmm.DECODE
    assert qmm.select_block_sizes(17) is qmm.DECODE_WIDE
    assert qmm.select_block_sizes(qmm.DECODE_MAX_M) is qmm.DECODE_WIDE
    assert qmm.select_block_sizes(qmm.DECODE_MAX_M + 1) is qmm.PREFILL
    assert qmm.select_block_sizes(1, jnp.float32) is qmm.DECODE_F32
    assert qmm.select_block_sizes(64, jnp.float32) is qmm.DECODE_WIDE_F32
    assert qmm.select_block_sizes(65, jnp.float32, arch=90) is qmm.PREFILL_F32
    # Prefill per architecture: given, or read from the GPU the trace is lowered for.
    assert qmm.select_block_sizes(4096, arch=80) is qmm.PREFILL_SM80
    assert qmm.select_block_sizes(4096, arch=90) is qmm.PREFILL
    with targets.abstract_gpu(targets.A100):
        assert targets.current_arch() == 80
        assert qmm.select_block_sizes(4096) is qmm.PREFILL_SM80
    with targets.abstract_gpu(targets.H100):
        assert targets.current_arch() == 90
    if INTERPRET:  # no GPU: the default
        assert targets.current_arch(default=75) == 75
    packed = _abstract((4096, 4096), TWN)
    decode, mp = qmm._fit(qmm.DECODE, packed, 1)
    # 8 tiles of 512 would give 8 splits of one step (no loop to pipeline): 16 tiles of 256.
    assert (decode.block_m, mp, decode.block_k, decode.k_splits) == (16, 16, 256, 8)
    assert decode.k_splits * (4096 // decode.block_n) >= 256  # enough programs for one row
    prefill, mp = qmm._fit(qmm.PREFILL, packed, 4096)
    assert (prefill.block_m, prefill.k_splits, mp) == (128, 1, 4096)
    group, _ = qmm._fit(qmm.DECODE, _abstract((512, 64), ASYM4), 1)
    assert group.block_k == 32  # a K tile never crosses a scale group


def test_awkward_k_splits_unevenly_to_fill_the_gpu():
    # LLaMA-7B's down projection: K = 11008 is 43 K tiles of 256 (prime: no even split), so one
    # decode token had 32 programs; 9 splits of 5 tiles (the last starts 2 tiles early) give 288.
    down, _ = qmm._fit(qmm.DECODE, _abstract((11008, 4096), TWN), 1)
    assert (down.block_k, down.k_splits) == (256, 9)
    assert (4096 // down.block_n) * down.k_splits == 288
    # Shapes whose tiles split evenly keep the default tile and split exactly.
    square, _ = qmm._fit(qmm.DECODE, _abstract((8192, 8192), TWN), 1)
    assert (square.block_k, square.k_splits) == (512, 4)
    # Where some split count divides the tiles, it wins over more splits that overrun: 64 rows
    # of 8192 x 8192 want 5 splits of 32 tiles of 256 and take 4 of 8 (not 5 of 7, 3 idle).
    wide, _ = qmm._fit(qmm.DECODE_WIDE, _abstract((8192, 8192), TWN), 64)
    assert (wide.block_k, wide.k_splits) == (256, 4)
    # Explicit splits are kept as given.
    fixed, _ = qmm._fit(
        dataclasses.replace(qmm.DECODE, k_splits=1), _abstract((11008, 4096), TWN), 1
    )
    assert (fixed.block_k, fixed.k_splits) == (256, 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "spec", [TWN, QuantSpec("asym", 4, "group", 128), SYM8], ids=lambda s: s.method
)
@pytest.mark.parametrize(("block_k", "splits"), [(128, 3), (128, 4), (256, 2)])
def test_uneven_splits(spec, dtype, block_k, splits):
    # K = 1280: 10 tiles of 128 in 3 splits of 4 (the last starts 2 tiles early and reads
    # zeros there), in 4 splits of 3; 5 tiles of 256 in 2 splits of 3 (ternary; 128-row scale
    # groups and 8-bit codes cap the tile at 128: 10 tiles in 2 splits of 5).
    x, packed = _problem(spec, (3, 1280), 1280, 128, dtype, seed=block_k + splits)
    blocks = dataclasses.replace(qmm.DECODE, block_k=block_k, k_splits=splits)
    fitted, _ = qmm._fit(blocks, packed, 3)
    assert fitted.k_splits == splits and fitted.block_k == (block_k if spec is TWN else 128)
    out = qmm.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=blocks)
    assert _relative_error(out, x, packed) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "spec",
    [TWN, QuantSpec("asym", 4, "group", 128), QuantSpec("sym", 4, "group", 256)],
    ids=lambda s: f"{s.method}{s.bits}",
)
def test_paired_unpacking_equals_expanded_rows(spec, dtype):
    # The two unpackings of 2-/4-bit codes (two codes per 32-bit op into 16-bit floats offset
    # by 1, then x's sums taken away; or each code expanded to a float32 row) give the same
    # product, with channel scales (applied once after the loop) and group scales (per tile).
    x, packed = _problem(spec, (5, 1024), 1024, 192, dtype, seed=11)
    paired = dataclasses.replace(qmm.DECODE, block_k=256, k_splits=2)
    rows = dataclasses.replace(paired, pairs=False)
    out_paired = qmm.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=paired)
    out_rows = qmm.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=rows)
    ref = np.asarray(x, np.float64) @ np.asarray(_unpack(packed), np.float64)
    # Both within the output's rounding of the exact product, and of each other.
    assert _relative(out_paired, ref) < TOLERANCE[jnp.bfloat16]
    assert _relative(out_paired, out_rows) < TOLERANCE[jnp.bfloat16]
    # The paired path is taken only where a dot still covers 16 K rows (mma k16).
    assert qmm._pairs_apply(qmm._fit(paired, packed, 5)[0], packed, dtype)
    small = dataclasses.replace(paired, block_k=64)
    assert qmm._pairs_apply(qmm._fit(small, packed, 5)[0], packed, dtype) == (spec.bits == 4)
    assert not qmm._pairs_apply(qmm._fit(paired, packed, 5)[0], packed, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("spec", [TWN, ASYM4], ids=lambda s: s.method)
def test_gradient_wrt_x_equals_reference(spec, dtype):
    x, packed = _problem(spec, (2, 5, 64), 64, 96, dtype, seed=7)
    cotangent = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 96)), dtype)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, packed).astype(jnp.float32) * cotangent)

    kernel = jax.grad(loss(lambda x, p: qmm.quantized_matmul(x, p, interpret=INTERPRET)))(x)
    reference = jax.grad(loss(qmm.quantized_matmul_reference))(x)
    assert kernel.dtype == dtype
    if INTERPRET:  # the backward pass is the reference's: one program, one result
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference))
    else:  # two programs that XLA:GPU may give different GEMMs (TF32, other summation orders)
        assert _relative(kernel, reference) < TOLERANCE[dtype]
    expected = np.asarray(cotangent, np.float64) @ np.asarray(_unpack(packed), np.float64).T
    err = np.linalg.norm(np.asarray(kernel, np.float64) - expected) / np.linalg.norm(expected)
    assert err < TOLERANCE[dtype]


def test_inside_jit_and_scan():
    # The decoder's use: stacked packed layers sliced by lax.scan, under jit.
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.normal(size=(3, 64, 64)) * 0.2, jnp.float32)
    packed = _pack(w, TWN)
    h = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)

    def run(matmul):
        def step(h, layer):
            return jnp.tanh(matmul(h, layer)), None

        return jax.jit(lambda h, p: jax.lax.scan(step, h, p)[0])(h, packed)

    out = run(lambda h, p: qmm.quantized_matmul(h, p, interpret=INTERPRET))
    ref = run(qmm.quantized_matmul_reference)
    if INTERPRET:
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    else:  # TF32 in both, rounded differently
        assert _relative(out, ref) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("gpu", [targets.A100, targets.H200], ids=["sm80", "sm90"])
@pytest.mark.parametrize("rows", [1, 256], ids=["decode", "prefill"])
def test_lowers_for_triton(rows, gpu):
    """Both launches lower through Pallas' Triton rules for a CUDA target (no GPU needed)."""
    export = pytest.importorskip("jax.export")
    for spec in (TWN, ASYM4, SYM8):
        packed = _abstract((512, 256), spec)
        blocks = qmm.select_block_sizes(rows)
        fn = jax.jit(lambda x, p, b=blocks: qmm.quantized_matmul(x, p, block_sizes=b))
        with targets.abstract_gpu(gpu):
            exported = export.export(
                fn,
                platforms=("cuda",),
                disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
            )(jax.ShapeDtypeStruct((rows, 512), jnp.bfloat16), packed)
        assert "xla.gpu.triton" in exported.mlir_module()


def test_rejects_bad_inputs():
    packed = _pack(jnp.ones((2, 32, 16)), TWN)
    with pytest.raises(ValueError, match="one matrix"):
        qmm.quantized_matmul(jnp.ones((1, 32)), packed, interpret=True)
    one = jax.tree.map(lambda a: a[0], packed)
    with pytest.raises(ValueError, match="features"):
        qmm.quantized_matmul(jnp.ones((1, 31)), one, interpret=True)
    # 2-bit words hold 16 rows; groups of 8 rows cannot be tiled (unpack still works).
    odd = _pack(jnp.ones((32, 16)), QuantSpec("twn", 2, "group", 8))
    with pytest.raises(NotImplementedError, match="group size"):
        qmm.quantized_matmul(jnp.ones((1, 32)), odd, interpret=True)

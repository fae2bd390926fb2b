"""The Pallas TPU kernel == x @ unpack(packed) for every packed format, its grad, the kernel choice,
and its Mosaic compile for TPU v5e and v6e without a TPU (libtpu's compiler on this CPU).

The numerics run in Pallas interpret mode off a TPU (natively on one).
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import quantized_matmul_tpu as qmm_tpu
from pallas import targets
from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import export, qtensor
from tsld_jax.quant.quantizers import QuantSpec

INTERPRET = jax.default_backend() != "tpu"
_pack = jax.jit(qtensor.pack, static_argnums=(1,))
_unpack = jax.jit(qtensor.unpack)
# ||out - ref|| / ||ref|| bounds: float32 arithmetic, and bf16 operands/output.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small tiles: K = 512 and N = 384 give a grid of 4 K steps by 3 N blocks.
SMALL = qmm_tpu.BlockSizes(block_m=16, block_n=128, block_k=128)

# Every container (2-, 4-, 8-bit), the ternary one, and every scale granularity.
FORMATS = [
    QuantSpec("twn", 2, "channel"),  # ternary
    QuantSpec("pact", 2, "channel"),  # W2
    QuantSpec("asym", 4, "group", 128),  # W4, group scales and zero points
    QuantSpec("sym", 4, "channel"),  # W4
    QuantSpec("sym", 8, "channel"),  # W8
    QuantSpec("asym", 8, "tensor"),  # W8, int8 codes stored with an offset, one scale
]


def _fid(spec):
    return f"{spec.method}{spec.bits}-{spec.granularity}"


def _problem(spec, m, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)) * rng.uniform(0.5, 2.0, size=(n,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(m, k)) + 0.1, dtype)
    return x, _pack(w, spec)


def _relative(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _dense(x, packed):  # independent of both kernels: numpy float64 over the unpacked weights
    return np.asarray(x, np.float64) @ np.asarray(_unpack(packed), np.float64)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("spec", FORMATS, ids=_fid)
def test_matches_reference_bf16(spec, m):
    x, packed = _problem(spec, m, 512, 384, jnp.bfloat16, seed=m + 7 * spec.bits)
    out = qmm_tpu.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=SMALL)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, 384)
    assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.bfloat16]
    ref = qmm_tpu.quantized_matmul_reference(x, packed)
    assert _relative(out, ref) < TOLERANCE[jnp.bfloat16]


@pytest.mark.parametrize("spec", FORMATS, ids=_fid)
def test_matches_reference_f32(spec):
    # Ragged M, K and N (padded to 16 rows, 640 and 320; groups need K = 640), 5 K steps.
    k = 640 if spec.granularity == "group" else 600
    x, packed = _problem(spec, 3, k, 300, jnp.float32, seed=spec.bits)
    out = qmm_tpu.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=SMALL)
    assert out.dtype == jnp.float32 and out.shape == (3, 300)
    assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.float32]
    ref = qmm_tpu.quantized_matmul_reference(x, packed)
    assert _relative(out, ref) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("m", [2, 80], ids=["decode", "prefill"])
def test_default_launches(m):
    # The launches `select_block_sizes` picks, fitted to a 1024 x 640 problem with 128-row scale
    # groups: decode takes all of K (8 groups) in one step, prefill two steps of 4 groups.
    spec = QuantSpec("asym", 4, "group", 128)
    x, packed = _problem(spec, m, 1024, 640, jnp.bfloat16, seed=m)
    blocks = qmm_tpu.select_block_sizes(m)
    assert blocks is (qmm_tpu.DECODE if m <= qmm_tpu.DECODE_MAX_M else qmm_tpu.PREFILL)
    fitted, mp = qmm_tpu._fit(blocks, packed, m)
    assert fitted.block_k == (1024 if m == 2 else 512)
    assert fitted.block_n == 128  # 640 = 5 x 128
    assert mp == (16 if m == 2 else 80)  # M rounded up to 16 rows, in one block
    out = qmm_tpu.quantized_matmul(x, packed, interpret=INTERPRET)
    assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.bfloat16]
    assert _relative(out, qmm_tpu.quantized_matmul_reference(x, packed)) < TOLERANCE[jnp.bfloat16]
    channel = _pack(jnp.ones((4096, 512)), QuantSpec("twn", 2, "channel"))
    assert qmm_tpu._fit(qmm_tpu.DECODE, channel, 1)[0] == qmm_tpu.BlockSizes(16, 512, 2048)
    assert qmm_tpu._fit(qmm_tpu.PREFILL, channel, 4096)[0] == qmm_tpu.PREFILL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("asym", 4, "group", 128),
        QuantSpec("sym", 2, "group", 256),
        QuantSpec("asym", 8, "group", 128),
    ],
    ids=_fid,
)
def test_tiles_of_several_groups(spec, dtype):
    # K tiles of 512 rows hold 4 (or 2) scale groups, each its own dot and scale row; K = 1536
    # gives 3 K steps, so the scale blocks move with the steps.
    x, packed = _problem(spec, 5, 1536, 256, dtype, seed=spec.bits + spec.group_size)
    blocks = qmm_tpu.BlockSizes(block_m=16, block_n=128, block_k=512)
    assert qmm_tpu._fit(blocks, packed, 5)[0].block_k == 512
    out = qmm_tpu.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=blocks)
    assert _relative(out, _dense(x, packed)) < TOLERANCE[dtype]
    assert _relative(out, qmm_tpu.quantized_matmul_reference(x, packed)) < TOLERANCE[dtype]


def test_longer_k_tiles_where_k_has_few_divisors():
    # LLaMA's K = 11008 = 2 x 43 x 128 tiles by 256 rows below 5504: 2-/4-bit decode takes
    # 5504-row tiles of 128 columns (about the weights of 2048 x 512), int8 keeps 256 x 512.
    decode = {
        spec.bits: qmm_tpu._fit(qmm_tpu.DECODE, _abstract_cpu(spec, 11008, 4096), 1)[0]
        for spec in (FORMATS[0], FORMATS[2], FORMATS[4])
    }
    assert decode[2] == decode[4] == qmm_tpu.BlockSizes(16, 128, 5504)
    assert decode[8] == qmm_tpu.BlockSizes(16, 512, 256)
    # The same rule at a small size, run: K = 640 = 5 x 128 with 512-row launches.
    spec = QuantSpec("asym", 4, "group", 128)
    x, packed = _problem(spec, 3, 640, 256, jnp.bfloat16, seed=640)
    blocks = qmm_tpu.BlockSizes(block_m=16, block_n=256, block_k=512)
    assert qmm_tpu._fit(blocks, packed, 3)[0] == qmm_tpu.BlockSizes(16, 128, 640)
    out = qmm_tpu.quantized_matmul(x, packed, interpret=INTERPRET, block_sizes=blocks)
    assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.bfloat16]


def _abstract_cpu(spec, k, n):
    return jax.eval_shape(
        lambda w: qtensor.pack(w, spec), jax.ShapeDtypeStruct((k, n), jnp.float32)
    )


def test_field_major_order():
    # Column f W + j of a tile holds column P j + f (W = block_k / P word rows).
    x = jnp.arange(2 * 256, dtype=jnp.float32).reshape(1, 512)
    permuted = np.asarray(qmm_tpu._field_major(x, 256, 16))[0]
    tile, f, j = 1, 3, 5
    assert permuted[tile * 256 + f * 16 + j] == tile * 256 + 16 * j + f
    assert sorted(permuted.tolist()) == list(range(512))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_gradient_wrt_x_equals_reference(dtype):
    spec = QuantSpec("twn", 2, "channel")
    x, packed = _problem(spec, 5, 256, 128, dtype, seed=3)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=(5, 128)), dtype)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, packed).astype(jnp.float32) * cotangent)

    kernel = jax.grad(loss(lambda x, p: qmm_tpu.quantized_matmul(x, p, interpret=INTERPRET)))(x)
    reference = jax.grad(loss(qmm_tpu.quantized_matmul_reference))(x)
    assert kernel.dtype == dtype
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference))
    expected = np.asarray(cotangent, np.float64) @ np.asarray(_unpack(packed), np.float64).T
    assert _relative(kernel, expected) < TOLERANCE[dtype]


def test_formats_without_a_k_tile():
    # K tiles are multiples of 128 rows, inside one scale group or of whole groups: 32-row
    # groups and a padded K of 576 (SmolLM2's width; 4.5 x 128) have none. The kernel refuses
    # them; "auto" falls back to XLA's dot.
    for spec, k in [
        (QuantSpec("asym", 4, "group", 32), 256),
        (QuantSpec("twn", 2, "channel"), 576),
    ]:
        x, packed = _problem(spec, 2, k, 128, jnp.float32, seed=k)
        assert not qmm_tpu.supports(packed)
        with pytest.raises(NotImplementedError, match="no K tile"):
            qmm_tpu.quantized_matmul(x, packed, interpret=True)
        out = export.packed_matmul(x, packed, "auto")
        assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.float32]
    assert qmm_tpu.supports(_problem(FORMATS[0], 1, 640, 64, jnp.float32, seed=0)[1])


def test_kernel_names_select_it():
    spec = QuantSpec("sym", 4, "channel")
    x, packed = _problem(spec, 4, 256, 128, jnp.bfloat16, seed=9)
    out = export.packed_matmul(x, packed, "interpret_tpu")
    direct = qmm_tpu.quantized_matmul(x, packed, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(direct))
    assert _relative(out, _dense(x, packed)) < TOLERANCE[jnp.bfloat16]
    # On this CPU, "auto" is XLA's dequantize-then-dot, unchanged by the TPU branch.
    auto = jax.jit(lambda x, p: export.packed_matmul(x, p, "auto"))
    reference = jax.jit(qmm_tpu.quantized_matmul_reference)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(auto(x, packed)), np.asarray(reference(x, packed)))
        assert "tpu_custom_call" not in auto.lower(x, packed).as_text()


def test_in_the_decoder():
    # A packed model's forward with the TPU kernel (sliced from stacked layers by the decoder's
    # scan, under jit) equals the same forward through XLA's dequantize-then-dot. Widths are
    # multiples of 128 so that every block linear tiles.
    spec = ModelSpec(
        family="llama", vocab_size=61, hidden_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, mlp_size=256, norm="rmsnorm", activation="silu",
        gated_mlp=True, positional="rotary", attn_bias=False, attn_out_bias=False,
        mlp_bias=False, tie_embeddings=False,
    )  # fmt: skip
    params = decoder.init_params(jax.random.key(0), spec)
    packed = export.export_packed(params, QuantSpec("asym", 4, "group", 128))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, spec.vocab_size)

    def logits(kernel):
        fn = jax.jit(lambda p, t: decoder.forward(p, t, spec, packed_kernel=kernel))
        return fn(packed, tokens)

    kernel = "pallas_tpu" if jax.default_backend() == "tpu" else "interpret_tpu"
    assert _relative(logits(kernel), logits("xla")) < 1e-5


def test_scoped_vmem_bytes_parsing():
    # The compiled HLO's backend_config of a Mosaic call, abridged: VMEM is memory space 1.
    hlo = (
        '%a = custom-call(), custom_call_target="tpu_custom_call", backend_config={"flag_configs":'
        '[],"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"724992"}]}\n'
        '%b = custom-call(), custom_call_target="tpu_custom_call", backend_config={'
        '"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"2048"}]}'
    )
    assert qmm_tpu.scoped_vmem_bytes(hlo) == 724992
    assert qmm_tpu.scoped_vmem_bytes("ENTRY %main {}") == 0


# --- Deviceless compiles for TPU v5e and v6e (libtpu's compiler on the CPU) ----------------------

_NO_LIBTPU = importlib.util.find_spec("libtpu") is None
_TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2"}


def _tpu_device(chip):
    if _NO_LIBTPU:
        pytest.skip("libtpu is not installed (pip install libtpu): no TPU compiler")
    if jax.default_backend() != "cpu":
        pytest.skip("deviceless TPU compiles run with the CPU as the default backend")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server here
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the TPU it would drive; with
    # none to drive, another process compiling for TPUs (a --plan) must not fail this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGIES[chip])
    return topology.devices[0]  # a Mosaic kernel compiles for one device (no shard_map here)


def _nbytes(tree):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _abstract(spec, k, n, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    packed = jax.eval_shape(
        lambda w: qtensor.pack(w, spec), jax.ShapeDtypeStruct((k, n), jnp.float32)
    )
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), packed)


@pytest.mark.parametrize("chip", list(_TOPOLOGIES))
def test_compiles_for_tpu(chip):
    device = _tpu_device(chip)
    sharding = jax.sharding.SingleDeviceSharding(device)
    with targets.abstract_tpu(device.device_kind, device.num_cores):
        for spec in (FORMATS[0], FORMATS[2], FORMATS[4]):  # W2, W4 (groups), W8
            packed = _abstract(spec, 4096, 11008, device)
            for rows, dtype in [(1, jnp.bfloat16), (64, jnp.float32), (512, jnp.bfloat16)]:
                x = jax.ShapeDtypeStruct((rows, 4096), dtype, sharding=sharding)
                lowered = jax.jit(lambda x, p: qmm_tpu.quantized_matmul(x, p)).lower(x, packed)
                assert "tpu_custom_call" in lowered.as_text()
                compiled = lowered.compile()  # Mosaic's own checks (layouts, VMEM) run here
                # The weights stay packed in HBM: no temporary as large as even 8-bit codes.
                memory = compiled.memory_analysis()
                assert memory.argument_size_in_bytes >= _nbytes(packed)
                assert memory.temp_size_in_bytes < 4096 * 11008
                # The kernel's VMEM (the scoped memory the compiled call reserves) fits the
                # 16 MiB that Mosaic may use by default on both chips.
                vmem = qmm_tpu.scoped_vmem_bytes(compiled.as_text())
                assert 0 < vmem <= 16 * 2**20
        # "auto" picks the kernel when the program is compiled for a TPU.
        x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16, sharding=sharding)
        packed = _abstract(FORMATS[0], 4096, 11008, device)
        auto = jax.jit(lambda x, p: export.packed_matmul(x, p, "auto")).lower(x, packed)
        assert "tpu_custom_call" in auto.as_text()
        unsupported = _abstract(QuantSpec("asym", 4, "group", 32), 4096, 11008, device)
        fallback = jax.jit(lambda x, p: export.packed_matmul(x, p, "auto")).lower(x, unsupported)
        assert "tpu_custom_call" not in fallback.as_text()

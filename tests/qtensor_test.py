"""pack/unpack round trips: unpack(pack(w)) is bit-identical to fake_quantize(w)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsld_jax.quant import qtensor, quantizers
from tsld_jax.quant.quantizers import QuantSpec

SPECS = [
    QuantSpec("twn", 2, "channel"),
    QuantSpec("twn", 2, "group", 16),
    QuantSpec("twn", 2, "tensor"),
    QuantSpec("asym", 4, "channel"),
    QuantSpec("asym", 4, "group", 16),
    QuantSpec("asym", 4, "tensor"),
    QuantSpec("sym", 8, "channel"),
    QuantSpec("sym", 8, "group", 16),
    QuantSpec("sym", 8, "tensor"),
    # Other widths share the containers: 3 bits in 4, 5..8 bits in int8 (asym's offset code).
    QuantSpec("asym", 8, "group", 8),
    QuantSpec("asym", 3, "channel"),
    QuantSpec("sym", 4, "group", 8),
    QuantSpec("pact", 2, "channel"),
    QuantSpec("pact", 4, "group", 16),
]
# Ragged (not multiples of the packing or the 64-wide padding), aligned, and stacked (L, K, N).
SHAPES = [(48, 23), (64, 128), (2, 80, 70)]


# Most checks here do not depend on eager vs jit; jit compiles once per shape instead of per op.
_pack = jax.jit(qtensor.pack, static_argnums=(1,))
_unpack = jax.jit(qtensor.unpack)
_fake_quantize = jax.jit(quantizers.fake_quantize, static_argnums=(1,))


def _ids(spec):
    return f"{spec.method}{spec.bits}-{spec.granularity}{spec.group_size or ''}"


def _weights(shape, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape[-1:])  # per-column spread
    return jnp.asarray(w, dtype)


def _gamma(spec, shape, seed):
    if spec.method != "pact":
        return None
    rng = np.random.default_rng(seed + 1)
    return jnp.asarray(rng.uniform(0.5, 1.5, quantizers.scale_shape(spec, shape)), jnp.float32)


def _assert_bit_equal(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Signed zeros aside (the stored integer 0 has no sign), the bit patterns must agree; adding
    # +0.0 maps -0.0 to +0.0 and leaves every other value, NaN included, as it is.
    np.testing.assert_array_equal((actual + 0.0).view(np.uint8), (expected + 0.0).view(np.uint8))


CASES = [(spec, shape) for spec in SPECS[:9] for shape in SHAPES] + [
    (spec, SHAPES[-1]) for spec in SPECS[9:]
]


def _case_id(value):
    return _ids(value) if isinstance(value, QuantSpec) else str(value)


@pytest.mark.parametrize(("spec", "shape"), CASES, ids=_case_id)
def test_round_trip_is_fake_quantize_jit(spec, shape):
    seed = hash((_ids(spec), shape)) % 2**31
    w, gamma = _weights(shape, seed), _gamma(spec, shape, seed)
    # XLA rewrites some divisions under jit, so fake_quantize itself differs between eager and
    # jit by an ulp for sym and PACT+: compare like with like.
    packed_then_unpacked = jax.jit(lambda w, g: qtensor.unpack(qtensor.pack(w, spec, g)))(w, gamma)
    expected = jax.jit(lambda w, g: quantizers.fake_quantize(w, spec, g))(w, gamma)
    _assert_bit_equal(packed_then_unpacked, expected)


# Eager dispatch compiles every op for every shape: one (ragged, stacked) shape per spec.
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_round_trip_is_fake_quantize_eager(spec):
    shape = SHAPES[-1]
    w, gamma = _weights(shape, 7), _gamma(spec, shape, 7)
    packed = qtensor.pack(w, spec, gamma)
    _assert_bit_equal(qtensor.unpack(packed), quantizers.fake_quantize(w, spec, gamma))


@pytest.mark.parametrize("spec", SPECS[:9], ids=_ids)
def test_layout(spec):
    k, n = 40 if spec.granularity != "group" else 48, 70
    packed = _pack(_weights((3, k, n), 0), spec)
    kp, np_ = packed.padded_shape
    assert kp % 16 == 0 and np_ % qtensor.N_ALIGN == 0 and kp >= k and np_ >= n
    per_word = {2: 16, 4: 8, 8: 1}[spec.bits]
    assert packed.codes.shape == (3, kp // per_word, np_)
    assert packed.codes.dtype == (jnp.int8 if spec.bits == 8 else jnp.int32)
    groups = {"channel": (1, np_), "tensor": (1, 1), "group": (kp // 16, np_)}[spec.granularity]
    assert packed.scales.shape == (3, *groups) and packed.scales.dtype == jnp.float32
    assert (packed.zeros is not None) == (spec.method == "asym")
    ints = qtensor.unpack_ints(packed)
    low = -(2 ** (spec.bits - 1)) if spec.method != "asym" else 0
    assert int(ints.min()) >= low and int(ints.max()) < 2**spec.bits


def test_bf16_latent_weights():
    spec = QuantSpec("twn", 2, "channel")
    w = _weights((37, 29), 3, jnp.bfloat16)
    out = qtensor.unpack(qtensor.pack(w, spec))
    assert out.dtype == jnp.bfloat16
    _assert_bit_equal(
        out.astype(jnp.float32), quantizers.fake_quantize(w, spec).astype(jnp.float32)
    )


def test_is_a_pytree_that_scan_slices():
    spec = QuantSpec("asym", 4, "group", 16)
    w = _weights((3, 32, 40), 4)
    packed = _pack(w, spec)
    assert len(jax.tree.leaves(packed)) == 3

    def body(carry, layer):
        return carry, qtensor.unpack(layer)

    _, per_layer = jax.jit(lambda p: jax.lax.scan(body, 0, p))(packed)
    _assert_bit_equal(per_layer, _fake_quantize(w, spec))
    one = jax.tree.map(lambda a: a[1], packed)
    _assert_bit_equal(_unpack(one), _fake_quantize(w[1], spec))


def test_all_zero_columns_stay_finite():
    w = _weights((32, 64), 5).at[:, :7].set(0.0)
    for spec in SPECS[:9:2]:
        out = jax.jit(lambda w, spec=spec: qtensor.unpack(qtensor.pack(w, spec)))(w)
        assert np.isfinite(np.asarray(out)).all()
        _assert_bit_equal(out, _fake_quantize(w, spec))


def test_bytes():
    w = _weights((2, 256, 128), 6)
    two = _pack(w, QuantSpec("twn", 2, "channel"))
    assert qtensor.dense_nbytes(two) == 2 * 256 * 128 * 2
    assert two.nbytes == 2 * (256 * 128 // 4 + 128 * 4)  # 2 bits a weight plus a scale a column
    four = _pack(w, QuantSpec("asym", 4, "group", 128))
    assert four.nbytes == 2 * (256 * 128 // 2 + 2 * 128 * (4 + 2))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        qtensor.pack(_weights((40, 8), 0), QuantSpec("twn", 2, "group", 16))
    with pytest.raises(ValueError, match="only learned by method 'pact'"):
        qtensor.pack(_weights((16, 8), 0), QuantSpec("twn", 2, "channel"), jnp.ones((8,)))

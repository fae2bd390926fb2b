"""The straight-through quantizers against a loop-by-loop numpy reading of PAPER.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsld_jax.quant import quantizers
from tsld_jax.quant.quantizers import QuantSpec

SHAPES = [(16, 6), (2, 24, 5)]  # (..., in, out); the 3-D one has a stacked layer axis
GRANULARITIES = [("channel", None), ("group", 4), ("group", 8), ("tensor", None)]
METHOD_BITS = [("twn", 2), ("pact", 2), ("pact", 4), ("asym", 4), ("sym", 8), ("sym", 3)]


# ----------------------------------------------------------------------------- numpy reference
def _np_twn(w, bits, gamma):
    delta = 0.7 * np.mean(np.abs(w))
    mask = np.abs(w) > delta
    alpha = np.sum(np.abs(w) * mask) / np.sum(mask)
    return alpha * np.sign(w) * mask


def _np_pact(w, bits, gamma):
    n = 2 ** (bits - 1) - 1
    clip = gamma * np.mean(np.abs(w))
    u = np.clip(w, -clip, clip) / clip
    return np.round(u * n) / n * clip


def _np_asym(w, bits, gamma):
    top = 2**bits - 1
    scale = max(w.max() - w.min(), 1e-5) / top
    zero = np.clip(-np.round(w.min() / scale), 0, top)
    return (np.clip(np.round(w / scale) + zero, 0, top) - zero) * scale


def _np_sym(w, bits, gamma):
    s = (2 ** (bits - 1) - 1) / np.max(np.abs(w))
    return np.round(w * s) / s


NP_QUANTIZERS = {"twn": _np_twn, "pact": _np_pact, "asym": _np_asym, "sym": _np_sym}


def _np_blocks(n_in, n_out, spec):
    """(input rows, output column) index pairs of every group that shares one scale."""
    if spec.granularity == "tensor":
        return [(slice(None), slice(None), ())]
    size = n_in if spec.granularity == "channel" else spec.group_size
    return [
        (slice(g, g + size), slice(o, o + 1), (g // size, o) if spec.granularity == "group" else o)
        for o in range(n_out)
        for g in range(0, n_in, size)
    ]


def np_fake_quantize(w, spec, gamma=None):
    w = np.asarray(w, np.float64)
    if w.ndim > 2:
        gammas = [None] * w.shape[0] if gamma is None else list(gamma)
        return np.stack([np_fake_quantize(m, spec, g) for m, g in zip(w, gammas, strict=True)])
    out = np.zeros_like(w)
    for rows, cols, index in _np_blocks(*w.shape, spec):
        g = 1.0 if gamma is None else np.asarray(gamma, np.float64)[index]
        out[rows, cols] = NP_QUANTIZERS[spec.method](w[rows, cols], spec.bits, g)
    return out


# ----------------------------------------------------------------------------- helpers
def _spec(method, bits, granularity, group_size):
    return QuantSpec(method, bits, granularity, group_size)


def _weights(shape, seed=0):
    return np.random.default_rng(seed).normal(0.0, 0.05, size=shape).astype(np.float32)


def _gamma(spec, shape, seed=1):
    low, high = (0.5, 1.5)
    sshape = quantizers.scale_shape(spec, shape)
    return np.random.default_rng(seed).uniform(low, high, size=sshape).astype(np.float32)


def _cases():
    for method, bits in METHOD_BITS:
        for granularity, group_size in GRANULARITIES:
            for shape in SHAPES:
                if group_size and shape[-2] % group_size:
                    continue
                yield method, bits, granularity, group_size, shape


CASES = list(_cases())
# Eager dispatch compiles every op separately, so eager mode runs on the stacked shape only.
CASES_AND_MODES = [(*case, True) for case in CASES] + [
    (*case, False) for case in CASES if len(case[-1]) == 3
]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method,bits,granularity,group_size,shape,jit", CASES_AND_MODES)
def test_matches_numpy(method, bits, granularity, group_size, shape, jit):
    spec = _spec(method, bits, granularity, group_size)
    w = _weights(shape)
    gamma = _gamma(spec, shape) if method == "pact" else None
    fn = jax.jit(quantizers.fake_quantize, static_argnums=1) if jit else quantizers.fake_quantize
    got = fn(jnp.asarray(w), spec, None if gamma is None else jnp.asarray(gamma))
    assert got.shape == w.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got), np_fake_quantize(w, spec, gamma), rtol=2e-6, atol=1e-8
    )


LEVEL_RANGES = {"twn": lambda b: (-1, 1), "pact": lambda b: (1 - 2 ** (b - 1), 2 ** (b - 1) - 1)}
LEVEL_RANGES["sym"] = LEVEL_RANGES["pact"]
LEVEL_RANGES["asym"] = lambda b: (0, 2**b - 1)


@pytest.mark.parametrize("method,bits", METHOD_BITS)
@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
def test_levels_are_integers_in_range_and_dequantize_to_fake_quantize(
    method, bits, granularity, group_size
):
    spec = QuantSpec(method, bits, granularity, group_size)
    shape = SHAPES[1]
    w = jnp.asarray(_weights(shape))
    gamma = jnp.asarray(_gamma(spec, shape)) if method == "pact" else None

    @jax.jit
    def both(w, gamma):
        grouped = quantizers.to_groups(w, spec)
        group_gamma = None if gamma is None else quantizers.scale_to_groups(gamma, spec, shape)
        levels, scales, zeros = quantizers.quantize_levels(grouped, spec, group_gamma)
        q = quantizers.dequantize_levels(levels, scales, zeros, spec).reshape(shape)
        return levels, scales, zeros, q, quantizers.fake_quantize(w, spec, gamma)

    levels, scales, zeros, q, expected = both(w, gamma)
    levels = np.asarray(levels)
    low, high = LEVEL_RANGES[method](bits)
    np.testing.assert_array_equal(levels, np.round(levels))
    assert low <= levels.min() and levels.max() <= high
    assert scales.shape[-2] == 1 and (zeros is None) == (method != "asym")
    np.testing.assert_array_equal(np.asarray(quantizers.to_groups(w, spec)).reshape(shape), w)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(expected))


def test_pact_default_scale_is_one():
    spec = QuantSpec("pact", 2, "channel")
    w = _weights((8, 4))
    np.testing.assert_allclose(
        np.asarray(quantizers.fake_quantize(jnp.asarray(w), spec)),
        np_fake_quantize(w, spec, np.ones(4)),
        rtol=2e-6,
    )


@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
@pytest.mark.parametrize("method", ["twn", "pact"])
def test_ternary_has_at_most_three_values_per_group(method, granularity, group_size):
    spec = QuantSpec(method, 2, granularity, group_size)
    w = _weights((24, 5), seed=3)
    q = np.asarray(quantizers.fake_quantize(jnp.asarray(w), spec))
    for rows, cols, _ in _np_blocks(24, 5, spec):
        values = np.unique(q[rows, cols])
        assert len(values) <= 3, values
        magnitudes = np.unique(np.abs(values[values != 0]))
        assert len(magnitudes) <= 1, f"ternary levels must be {{-a, 0, a}}, got {values}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("twn", 2, "channel"),
        QuantSpec("twn", 2, "group", 8),
        QuantSpec("asym", 4, "group", 8),
        QuantSpec("asym", 3, "tensor"),
        QuantSpec("sym", 8, "channel"),
    ],
    ids=str,
)
def test_straight_through_gradient_is_the_upstream_gradient(spec, jit, dtype):
    w = jnp.asarray(_weights((2, 16, 6)), dtype)
    upstream = jnp.asarray(np.random.default_rng(7).normal(size=(2, 16, 6)), dtype)

    def vjp(w, upstream):
        out, pullback = jax.vjp(lambda x: quantizers.fake_quantize(x, spec), w)
        return out, pullback(upstream)[0]

    out, grad = (jax.jit(vjp) if jit else vjp)(w, upstream)
    assert out.dtype == dtype and grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(upstream))


def _np_pact_surrogate(w, gamma, bits, offsets):
    # The PACT+ quantizer with the rounding replaced by x + (round(x0) - x0), x0 frozen at the
    # evaluation point: the function whose exact derivative the straight-through rule computes.
    n = 2 ** (bits - 1) - 1
    clip = gamma[None, :] * np.mean(np.abs(w), axis=0, keepdims=True)
    u = np.clip(w, -clip, clip) / clip
    return (u * n + offsets) / n * clip


@pytest.mark.parametrize("bits", [2, 3])
def test_pact_gradients_match_finite_differences_of_the_surrogate(bits):
    spec = QuantSpec("pact", bits, "channel")
    w = _weights((12, 4), seed=5).astype(np.float64)
    gamma = np.array([0.6, 0.9, 1.2, 2.0])
    upstream = np.random.default_rng(6).normal(size=w.shape)
    n = 2 ** (bits - 1) - 1
    clip0 = gamma[None, :] * np.mean(np.abs(w), axis=0, keepdims=True)
    u0 = np.clip(w, -clip0, clip0) / clip0
    offsets = np.round(u0 * n) - u0 * n

    def objective(w, gamma):
        return np.sum(upstream * _np_pact_surrogate(w, gamma, bits, offsets))

    grad_w, grad_gamma = jax.grad(
        lambda w, g: jnp.sum(
            jnp.asarray(upstream, jnp.float32) * quantizers.fake_quantize(w, spec, g)
        ),
        argnums=(0, 1),
    )(jnp.asarray(w, jnp.float32), jnp.asarray(gamma, jnp.float32))

    eps = 1e-6
    fd_gamma = np.array(
        [
            (objective(w, gamma + eps * e) - objective(w, gamma - eps * e)) / (2 * eps)
            for e in np.eye(4)
        ]
    )
    assert np.abs(fd_gamma).min() > 1e-3, "every column should carry a gamma gradient"
    np.testing.assert_allclose(np.asarray(grad_gamma), fd_gamma, rtol=1e-4, atol=1e-6)
    for i, j in [(0, 0), (3, 1), (7, 2), (11, 3)]:
        step = np.zeros_like(w)
        step[i, j] = eps
        fd = (objective(w + step, gamma) - objective(w - step, gamma)) / (2 * eps)
        np.testing.assert_allclose(float(grad_w[i, j]), fd, rtol=1e-4, atol=1e-5)


def test_stacked_layers_are_quantized_independently():
    spec = QuantSpec("sym", 4, "tensor")
    w = _weights((3, 8, 4))
    w[1] *= 10.0  # a different scale per layer
    stacked = np.asarray(quantizers.fake_quantize(jnp.asarray(w), spec))
    for layer in range(3):
        alone = np.asarray(quantizers.fake_quantize(jnp.asarray(w[layer]), spec))
        np.testing.assert_array_equal(stacked[layer], alone)


def test_bfloat16_keeps_dtype_and_values():
    spec = QuantSpec("twn", 2, "channel")
    w = jnp.asarray(_weights((16, 4)), jnp.bfloat16)
    q = quantizers.fake_quantize(w, spec)
    assert q.dtype == jnp.bfloat16
    reference = np_fake_quantize(np.asarray(w.astype(jnp.float32)), spec)
    np.testing.assert_allclose(np.asarray(q.astype(jnp.float32)), reference, rtol=1e-2)


def test_all_zero_weights_stay_finite():
    for method, bits in METHOD_BITS:
        q = quantizers.fake_quantize(jnp.zeros((8, 3)), QuantSpec(method, bits, "channel"))
        np.testing.assert_array_equal(np.asarray(q), 0.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="ternary", bits=2), "unknown quantization method"),
        (dict(method="twn", bits=4), "supports bits"),
        (dict(method="sym", bits=1), "supports bits"),
        (dict(method="asym", bits=16), "supports bits"),
        (dict(method="sym", bits=8, granularity="row"), "unknown granularity"),
        (dict(method="sym", bits=8, granularity="group"), "positive int group_size"),
        (dict(method="sym", bits=8, granularity="group", group_size=0), "positive int"),
        (dict(method="sym", bits=8, granularity="channel", group_size=4), "only meaningful"),
    ],
)
def test_invalid_specs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_invalid_uses_raise():
    with pytest.raises(ValueError, match="does not divide the input dimension 12"):
        quantizers.fake_quantize(jnp.zeros((12, 4)), QuantSpec("asym", 4, "group", 8))
    with pytest.raises(ValueError, match="matrix"):
        quantizers.fake_quantize(jnp.zeros((12,)), QuantSpec("twn", 2))
    with pytest.raises(ValueError, match="only learned by method 'pact'"):
        quantizers.fake_quantize(jnp.zeros((12, 4)), QuantSpec("twn", 2), jnp.ones(4))
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        quantizers.fake_quantize(jnp.zeros((12, 4)), QuantSpec("pact", 2), jnp.ones(3))


def test_spec_is_hashable_and_static():
    assert hash(QuantSpec("twn", 2)) == hash(QuantSpec("twn", 2, "channel", None))
    assert len({QuantSpec("twn", 2), QuantSpec("sym", 8)}) == 2

"""Straight-through weight quantizers (PAPER.md, "Quantizers"), shared by every granularity.

A kernel is in Flax layout, `(..., in_features, out_features)`; leading axes (such as the stacked
layer axis L) are independent matrices. The statistics of a quantizer are taken over one
"group" of weights:

- "channel": one group per output feature (a column of the kernel, a row of PyTorch's weight);
- "group": `group_size` consecutive input features within one output column;
- "tensor": the whole matrix.

Internally a kernel is viewed as `(..., N, G, O)` and every statistic is reduced over the G axis
(N groups along the input axis, G elements per group, O output columns; "tensor" views the whole
matrix as N = O = 1). This one view serves all four quantizers and all three granularities.

Every formula lives in one public pair, `quantize_levels` (each weight's integer level and each
group's scale and zero point) and `dequantize_levels` (the weight they stand for); `fake_quantize`
composes them for QAT and `qtensor.pack` stores their output for export, so the two cannot drift.
TWN, asym and sym run under one `jax.custom_vjp` that passes the upstream gradient to the latent
weight unchanged (the straight-through estimator). PACT+ passes gradients straight through the
rounding only (`round_ste`); the clamp and the scale are differentiated normally, so gamma is
learned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

METHODS = ("twn", "pact", "asym", "sym")
GRANULARITIES = ("channel", "group", "tensor")
# Bit widths each method supports. TWN is ternary by construction; the others need at least one
# positive level (n = 2^(bits-1) - 1 >= 1) and fit the 2/4/8-bit packing of qtensor.py up to 8.
SUPPORTED_BITS = {
    "twn": (2,),
    "pact": tuple(range(2, 9)),
    "asym": tuple(range(2, 9)),
    "sym": tuple(range(2, 9)),
}
# Guards against a zero denominator in an all-zero row (the formulas divide by max|w| or mean|w|).
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is fake-quantized. Frozen and hashable, so it can be a static argument.

    Attributes:
      method: "twn" (ternary, TWN), "pact" (ternary or k-bit with a learned clipping scale gamma,
        QuantGPT's PACT+), "asym" (asymmetric min-max) or "sym" (symmetric max-abs).
      bits: bit width; 2 for "twn", 2..8 for the others.
      granularity: "channel" (one scale per output feature), "group" or "tensor".
      group_size: input features per group; required for, and only for, "group".
    """

    method: str
    bits: int
    granularity: str = "channel"
    group_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"unknown quantization method {self.method!r}; expected one of {METHODS}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        if self.bits not in SUPPORTED_BITS[self.method]:
            raise ValueError(
                f"method {self.method!r} supports bits in {SUPPORTED_BITS[self.method]}, "
                f"got {self.bits}"
            )
        if self.granularity == "group":
            if (
                isinstance(self.group_size, bool)
                or not isinstance(self.group_size, int)
                or self.group_size < 1
            ):
                raise ValueError(
                    f"granularity 'group' needs a positive int group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only meaningful with granularity 'group', "
                f"not {self.granularity!r}"
            )


def check_shape(spec: QuantSpec, shape: tuple[int, ...], where: str = "") -> None:
    """Raises a ValueError, naming `where` (a parameter path), if `spec` cannot quantize `shape`."""
    prefix = f"{where}: " if where else ""
    if len(shape) < 2:
        raise ValueError(
            f"{prefix}a quantized weight must be a (..., in_features, out_features) matrix, "
            f"got shape {tuple(shape)}"
        )
    if spec.granularity == "group" and shape[-2] % spec.group_size:
        raise ValueError(
            f"{prefix}group_size={spec.group_size} does not divide the input dimension "
            f"{shape[-2]} of the weight of shape {tuple(shape)}"
        )


def scale_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the learned PACT+ scale gamma for a kernel of `shape` (leading axes included).

    "channel": (..., out); "group": (..., in // group_size, out); "tensor": (...).
    """
    check_shape(spec, shape)
    *lead, n_in, n_out = shape
    if spec.granularity == "channel":
        return (*lead, n_out)
    if spec.granularity == "group":
        return (*lead, n_in // spec.group_size, n_out)
    return tuple(lead)


def to_groups(
    w: Float[Array, "*lead n_in n_out"], spec: QuantSpec
) -> Float[Array, "*lead n_groups group_size n_out"]:
    """Views a kernel as `(..., N, G, O)`, the layout every quantizer statistic reduces over.

    Axis -2 holds the G weights of one group: "channel" gives (..., 1, in, out), "group" gives
    (..., in // group_size, group_size, out) and "tensor" gives (..., 1, in * out, 1). A reshape
    only, so `to_groups(w, spec).reshape(w.shape)` is `w`.

    Args:
      w: a kernel `(..., in_features, out_features)`, already checked by `check_shape`.
      spec: the quantizer, whose granularity picks the grouping.

    Returns:
      The same values in the group view.
    """
    *lead, n_in, n_out = w.shape
    if spec.granularity == "channel":
        return w.reshape(*lead, 1, n_in, n_out)
    if spec.granularity == "group":
        return w.reshape(*lead, n_in // spec.group_size, spec.group_size, n_out)
    return w.reshape(*lead, 1, n_in * n_out, 1)


def scale_to_groups(
    scale: Float[Array, "..."], spec: QuantSpec, shape: tuple[int, ...]
) -> Float[Array, "*lead n_groups 1 n_out"]:
    """Broadcasts PACT+'s learned gamma against `to_groups` of a kernel of `shape`.

    Args:
      scale: gamma, of shape `scale_shape(spec, shape)`.
      spec: the quantizer.
      shape: the kernel's shape `(..., in_features, out_features)`.

    Returns:
      gamma with a singleton group axis: `(..., N, 1, O)` ("tensor": `(..., 1, 1, 1)`).

    Raises:
      ValueError: `scale` does not have the shape `scale_shape(spec, shape)`.
    """
    expected = scale_shape(spec, shape)
    if scale.shape != expected:
        raise ValueError(
            f"PACT+ scale has shape {scale.shape}, expected {expected} for a {spec.granularity} "
            f"quantizer of a weight of shape {tuple(shape)}"
        )
    if spec.granularity == "channel":
        return scale[..., None, None, :]
    if spec.granularity == "group":
        return scale[..., :, None, :]
    return scale[..., None, None, None]


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
    """round(x) forward, identity backward (the straight-through estimator of the rounding)."""
    return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


GroupStat = Float[Array, "*lead n_groups 1 n_out"]


def quantize_levels(
    w_groups: Float[Array, "*lead n_groups group_size n_out"],
    spec: QuantSpec,
    gamma: GroupStat | None = None,
) -> tuple[Float[Array, "*lead n_groups group_size n_out"], GroupStat, GroupStat | None]:
    """Each weight's integer level and each group's statistics: the "how" of every quantizer.

    `dequantize_levels(*quantize_levels(w_groups, spec, gamma), spec)` is the quantized image
    q(w) of PAPER.md's formulas; the fake-quantizers below compute exactly that, and
    `qtensor.pack` stores the same levels and statistics, which is why an exported weight
    unpacks to the QAT forward's weight bit for bit.

    | method | level                      | scale (per group)          | weight                 |
    |--------|----------------------------|----------------------------|------------------------|
    | twn    | sign(w) * (abs(w) > delta) | alpha                      | scale * level          |
    | asym   | 0 .. top                   | max(max - min, 1e-5) / top | (level - zero) * scale |
    | sym    | -n .. n                    | s = n / max abs(w)         | level / s              |
    | pact   | -n .. n (round_ste)        | clip = gamma * mean abs(w) | level / n * clip       |

    with n = 2^(bits-1) - 1 and top = 2^bits - 1.

    Args:
      w_groups: float32 weights in the `to_groups` view.
      spec: the quantizer.
      gamma: PACT+'s learned scale from `scale_to_groups` (required for "pact", else unused).

    Returns:
      (levels, scales, zeros): the levels as floats in the group view, the per-group scale
      `(..., N, 1, O)`, and asym's integer zero points (as floats, same shape) or None.
      PACT+'s levels pass gradients straight through the rounding, so its clip and gamma are
      differentiable; the other methods are meant to sit under a straight-through custom_vjp.
    """
    if spec.method == "twn":
        # PAPER.md, quantizer 1: delta = 0.7 mean|w|, alpha = mean of the |w| above delta.
        abs_w = jnp.abs(w_groups)
        delta = 0.7 * jnp.mean(abs_w, axis=-2, keepdims=True)
        mask = (abs_w > delta).astype(w_groups.dtype)
        count = jnp.maximum(jnp.sum(mask, axis=-2, keepdims=True), 1.0)  # 0: all-zero group
        alpha = jnp.sum(abs_w * mask, axis=-2, keepdims=True) / count
        return jnp.sign(w_groups) * mask, alpha, None
    if spec.method == "asym":
        # PAPER.md, quantizer 3: min-max scale and an integer zero point in [0, 2^b - 1].
        top = 2.0**spec.bits - 1.0
        low = jnp.min(w_groups, axis=-2, keepdims=True)
        high = jnp.max(w_groups, axis=-2, keepdims=True)
        step = jnp.maximum(high - low, 1e-5) / top
        zero = jnp.clip(-jnp.round(low / step), 0.0, top)
        return jnp.clip(jnp.round(w_groups / step) + zero, 0.0, top), step, zero
    if spec.method == "sym":
        # PAPER.md, quantizer 4: s = (2^(b-1) - 1) / max|w|.
        max_abs = jnp.max(jnp.abs(w_groups), axis=-2, keepdims=True)
        s = (2.0 ** (spec.bits - 1) - 1.0) / jnp.maximum(max_abs, _TINY)
        return jnp.round(w_groups * s), s, None
    if gamma is None:
        raise ValueError("method 'pact' needs its learned scale gamma")
    # PAPER.md, quantizer 2: clip = gamma mean|w|, u = clamp(w, -clip, clip) / clip.
    n = 2.0 ** (spec.bits - 1) - 1.0
    clip = jnp.maximum(gamma * jnp.mean(jnp.abs(w_groups), axis=-2, keepdims=True), _TINY)
    u = jnp.clip(w_groups, -clip, clip) / clip
    return round_ste(u * n), clip, None


def dequantize_levels(
    levels: Float[Array, "*lead n_groups group_size n_out"],
    scales: GroupStat,
    zeros: GroupStat | None,
    spec: QuantSpec,
) -> Float[Array, "*lead n_groups group_size n_out"]:
    """The weights that `quantize_levels`' levels and statistics stand for (its table's last
    column, in the same operation order, so the result is the same to the bit).

    Args:
      levels: integer levels as floats, in the group view.
      scales: the per-group scale.
      zeros: asym's zero points, else None.
      spec: the quantizer.

    Returns:
      The quantized weights, in the group view.
    """
    if spec.method == "twn":
        return scales * levels
    if spec.method == "asym":
        return (levels - zeros) * scales
    if spec.method == "sym":
        return levels / scales
    n = 2.0 ** (spec.bits - 1) - 1.0
    return levels / n * scales


def _fake_quantize_groups(w: jax.Array, spec: QuantSpec, gamma=None) -> jax.Array:
    w_groups = to_groups(w.astype(jnp.float32), spec)
    q = dequantize_levels(*quantize_levels(w_groups, spec, gamma), spec)
    return q.reshape(w.shape).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _straight_through(w: jax.Array, spec: QuantSpec) -> jax.Array:
    # TWN, asym and sym: q(w) forward, the upstream gradient passed to w unchanged backward.
    return _fake_quantize_groups(w, spec)


_straight_through.defvjp(
    lambda w, spec: (_fake_quantize_groups(w, spec), None), lambda spec, _, g: (g,)
)


def pact(w: jax.Array, spec: QuantSpec, scale: jax.Array) -> jax.Array:
    """PACT+ (QuantGPT) quantizer with a learned clipping scale gamma.

    PAPER.md, quantizer 2: clip = gamma * mean|w|, u = clamp(w, -clip, clip) / clip,
    q(w) = round_ste(u * n) / n * clip with n = 2^(bits-1) - 1. Only the rounding is
    straight-through (`round_ste`, a custom_vjp); the rest is differentiated normally, so both the
    latent weight and gamma receive gradients.
    """
    gamma = scale_to_groups(scale.astype(jnp.float32), spec, w.shape)
    return _fake_quantize_groups(w, spec, gamma)


def fake_quantize(
    w: Float[Array, "*lead n_in n_out"], spec: QuantSpec, scale: Float[Array, "..."] | None = None
) -> Float[Array, "*lead n_in n_out"]:
    """Quantizes and dequantizes a kernel: the QAT forward, with a straight-through backward.

    Args:
      w: a kernel of shape (..., in_features, out_features); leading axes are independent matrices.
      spec: the quantizer.
      scale: PACT+'s learned gamma, of shape `scale_shape(spec, w.shape)`; None means the
        initial value 1.0. Only allowed with method "pact".

    Returns:
      q(w), same shape and dtype as `w` (the maths runs in float32).

    Raises:
      ValueError: the shape does not suit the spec, or `scale` is given to a method without one.
    """
    check_shape(spec, w.shape)
    if spec.method == "pact":
        if scale is None:
            scale = jnp.ones(scale_shape(spec, w.shape), jnp.float32)
        return pact(w, spec, jnp.asarray(scale))
    if scale is not None:
        raise ValueError(f"a scale is only learned by method 'pact', not {spec.method!r}")
    return _straight_through(w, spec)

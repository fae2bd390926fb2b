"""Which parameters are quantized, and how: ordered (path regex -> spec) rules.

Rules decide *what* is quantized; `quantizers.py` decides *how*. A rule set is an ordered sequence
of `(regex, value)` pairs; a parameter's path is its dict keys joined by "/" (for example
"layers/attn/q/kernel"), and the first regex that matches the whole path (`re.fullmatch`) gives its
value. `match_rules` is generic over the value type, so the sharding rules reuse it with partition
specs as values.

The default rule set quantizes every linear layer of every block, for all four families (GPT-2's
Conv1D layers are converted into the same layout), and nothing else: embeddings, positions, norms,
biases, OPT's project_in/project_out and the LM head stay floating point (PAPER.md, "What gets
quantized").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from tsld_jax.quant import quantizers
from tsld_jax.quant.quantizers import QuantSpec

T = TypeVar("T")
Params = dict[str, Any]
Rules = Sequence[tuple[str, Any]]
Quantizer = Callable[[str, Params], jax.Array]

# The sibling leaf of a PACT+ kernel that holds its learned clipping scale gamma.
SCALE_NAME = "quant_scale"
# Every linear kernel of the scanned blocks (`decoder.LINEAR_NAMES`), with the stacked layer axis.
BLOCK_LINEAR_KERNELS = r"layers/(attn/(q|k|v|o)|mlp/(up|gate|down))/kernel"

TWN = QuantSpec("twn", 2, "channel")
PRESETS = {
    "twn": TWN,
    "pact2": QuantSpec("pact", 2, "channel"),
    "asym4": QuantSpec("asym", 4, "group", 128),
    "sym8": QuantSpec("sym", 8, "channel"),
}


def default_rules(spec: QuantSpec | None = TWN) -> tuple[tuple[str, QuantSpec | None], ...]:
    """Quantize every linear kernel of every block with `spec`, and nothing else.

    Args:
      spec: the quantizer of the block linears (TWN per channel, the paper's default).

    Returns:
      An ordered rule set ending with a catch-all that leaves everything else in float.
    """
    return ((BLOCK_LINEAR_KERNELS, spec), (r".*", None))


def preset_rules(name: str) -> tuple[tuple[str, QuantSpec | None], ...]:
    """The default rule set with a named quantizer, for `eval.py --quant NAME` and configs.

    Args:
      name: "twn" (ternary TWN, per channel), "pact2" (ternary PACT+, per channel),
        "asym4" (4-bit asymmetric, groups of 128 input features) or "sym8" (8-bit symmetric,
        per channel).

    Returns:
      The rule set; `quantize_params` raises, naming the parameter, if a dimension is not a
      multiple of the group size (there is no silent fallback to per-channel).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown quantization preset {name!r}; expected one of {sorted(PRESETS)}")
    return default_rules(PRESETS[name])


def path_name(path: Sequence[Any]) -> str:
    """A jax key path as a "/"-joined string ("layers/attn/q/kernel")."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def match(name: str, rules: Sequence[tuple[str, T]]) -> T:
    """The value of the first rule whose regex matches the whole of `name`.

    Raises:
      ValueError: no rule matches (end a rule set with a catch-all `(".*", default)`).
    """
    for pattern, value in rules:
        if re.fullmatch(pattern, name):
            return value
    raise ValueError(
        f"no rule matches parameter {name!r}; end the rules with a catch-all ('.*', ...)"
    )


def match_rules(tree: Any, rules: Sequence[tuple[str, T]]) -> Any:
    """Maps every leaf of a pytree to the value of the first rule matching its path.

    Args:
      tree: a pytree of arrays or shapes (nested dicts, as the decoder's params).
      rules: ordered (regex, value) pairs; first match wins.

    Returns:
      A pytree of the same structure whose leaves are rule values (which may be None, so treat
      the result as nested dicts, or flatten it with `is_leaf=lambda x: x is None`).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: match(path_name(path), rules),
        tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x),
    )


def resolve(params: Params, rules: Rules) -> Params:
    """The spec tree of `params`: a QuantSpec or None per leaf, validated against its shape.

    Raises:
      ValueError: a spec does not suit the shape of its parameter (the message names the path).
    """
    specs = match_rules(params, rules)
    _check_specs(params, specs)
    return specs


def _check_specs(params: Params, specs: Params, prefix: str = "") -> None:
    for key, value in params.items():
        path = f"{prefix}{key}"
        spec = specs.get(key) if isinstance(specs, Mapping) else None
        if isinstance(value, Mapping):
            _check_specs(value, spec if isinstance(spec, Mapping) else {}, path + "/")
        elif isinstance(spec, QuantSpec):
            shape = tuple(value) if isinstance(value, tuple) else tuple(value.shape)
            quantizers.check_shape(spec, shape, where=path)


def _spec_lookup(rules_or_specs: Any) -> Callable[[str], QuantSpec | None]:
    if isinstance(rules_or_specs, QuantSpec):
        rules_or_specs = default_rules(rules_or_specs)
    if isinstance(rules_or_specs, Mapping):
        specs = rules_or_specs

        def lookup(path: str) -> QuantSpec | None:
            node: Any = specs
            for key in path.split("/"):
                if not isinstance(node, Mapping) or key not in node:
                    return None
                node = node[key]
            return node if isinstance(node, QuantSpec) else None

        return lookup
    rules = tuple(rules_or_specs)
    return lambda path: match(path, rules)


def make_quantizer(rules_or_specs: Rules | Params | QuantSpec) -> Quantizer:
    """The `quantizer(name, layer_params) -> kernel` callable for `decoder.forward`.

    Inside the decoder's scan a linear layer is named like "attn/q" and its params have lost the
    stacked layer axis; its full path is "layers/<name>/kernel".

    Args:
      rules_or_specs: ordered rules, a spec tree from `resolve`, or a single QuantSpec (shorthand
        for `default_rules(spec)`).

    Returns:
      A quantizer returning the fake-quantized kernel (straight-through gradients), or the float
      kernel for layers no rule quantizes. PACT+ kernels read gamma from their "quant_scale"
      sibling (see `add_learned_scales`).
    """
    lookup = _spec_lookup(rules_or_specs)

    def quantizer(name: str, layer_params: Params) -> jax.Array:
        path = f"layers/{name}/kernel"
        spec = lookup(path)
        kernel = layer_params["kernel"]
        if spec is None:
            return kernel
        quantizers.check_shape(spec, kernel.shape, where=path)
        return quantizers.fake_quantize(kernel, spec, _learned_scale(spec, layer_params, path))

    return quantizer


def _learned_scale(spec: QuantSpec, layer_params: Params, path: str) -> jax.Array | None:
    if spec.method != "pact":
        return None
    if SCALE_NAME not in layer_params:
        raise ValueError(
            f"{path}: PACT+ needs a learned '{SCALE_NAME}' next to the kernel; "
            "call quant.add_learned_scales(params, rules) first"
        )
    return layer_params[SCALE_NAME]


def add_learned_scales(params: Params, rules: Rules, init_scale: float = 1.0) -> Params:
    """Adds PACT+'s trainable gamma, as a "quant_scale" sibling of every PACT+ kernel.

    Args:
      params: the parameter pytree (nested dicts).
      rules: the quantization rules.
      init_scale: the initial gamma (PAPER.md: 1.0; poor values clip many weights).

    Returns:
      A new pytree; each "quant_scale" is float32 of `quantizers.scale_shape(spec, kernel.shape)`,
      e.g. (L, out_features) for a per-channel stacked kernel.
    """
    specs = resolve(params, rules)

    def add(node: Params, spec_node: Params) -> Params:
        out = {}
        for key, value in node.items():
            if isinstance(value, Mapping):
                out[key] = add(value, spec_node[key])
            else:
                out[key] = value
        spec = spec_node.get("kernel") if "kernel" in node else None
        if isinstance(spec, QuantSpec) and spec.method == "pact":
            shape = quantizers.scale_shape(spec, tuple(node["kernel"].shape))
            out[SCALE_NAME] = jnp.full(shape, init_scale, jnp.float32)
        return out

    return add(params, specs)


def quantize_params(params: Params, rules: Rules) -> Params:
    """Post-training quantization: the round-to-nearest fake-quantized copy of `params`.

    The PTQ baseline of the paper: every kernel a rule quantizes is replaced by q(w) (same shape
    and dtype, stacked layers quantized one matrix at a time); everything else is copied. PACT+
    kernels use their learned "quant_scale", and those leaves are dropped from the result, which
    is a plain float model in the decoder's layout.

    Raises:
      ValueError: a spec does not suit its parameter, or a PACT+ kernel has no learned scale;
        the message names the parameter path.
    """
    specs = resolve(params, rules)

    def convert(node: Params, spec_node: Params, prefix: str) -> Params:
        out = {}
        for key, value in node.items():
            if key == SCALE_NAME:
                continue
            path = f"{prefix}{key}"
            spec = spec_node.get(key)
            if isinstance(value, Mapping):
                out[key] = convert(value, spec, path + "/")
            elif isinstance(spec, QuantSpec):
                scale = _learned_scale(spec, node, path)
                out[key] = quantizers.fake_quantize(value, spec, scale)
            else:
                out[key] = value
        return out

    return convert(params, specs, "")

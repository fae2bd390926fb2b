"""Packed models: export float or QAT parameters to PackedWeights, save, load, and run them.

A packed model is the decoder's parameter pytree in which every quantized block linear
`layers/<name>/kernel` (names in `decoder.LINEAR_NAMES`) is replaced by
`layers/<name>/packed`, a stacked `qtensor.PackedWeight`; everything else (embeddings, norms,
biases, the LM head) stays floating point, as in training. `decoder.linear` sees the "packed"
leaf and calls `packed_matmul`, so `decoder.forward(packed_params, tokens, spec)` runs as is.

Typical use:

    params = export_packed(qat_params, rules)            # or a QuantSpec, or a spec tree
    save_packed("model.safetensors", params, model_spec)
    ...
    params, model_spec = load_packed("model.safetensors")
    packed_tokenizer("model.safetensors")                 # TokenizerIdentity, or None
    logits = decoder.forward(params, tokens, model_spec)  # kernels in place of dense matmuls

`eval.py --packed PATH` is meant to call `load_packed(PATH)` and then evaluate as usual.

Which matmul runs is an argument of the forward pass (`decoder.forward(..., packed_kernel=)`,
`packed_matmul(..., kernel=)`, one of KERNELS), static and so part of the jitted program.
"auto", the default, is resolved when the program is lowered, by the platform it is lowered
for (`lax.platform_dependent`): the Pallas Triton kernel on a CUDA GPU, the Pallas TPU kernel
on a TPU (where it tiles the format, `quantized_matmul_tpu.supports`), XLA's
dequantize-then-dot elsewhere (interpret mode is a test tool).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tsld_jax.quant import qtensor, quantizers, rules
from tsld_jax.quant.qtensor import PackedWeight
from tsld_jax.quant.quantizers import QuantSpec

Params = dict[str, Any]

FORMAT = "tsld-jax-packed"
FORMAT_VERSION = "1"
KERNELS = ("auto", "pallas", "interpret", "pallas_tpu", "interpret_tpu", "xla")
PACKED = "packed"  # the leaf name that replaces "kernel" in a packed linear layer
# Paths whose kernel the decoder multiplies in `linear()`; only these can be packed.
_BLOCK_LINEAR = re.compile(r"layers/(attn/(q|k|v|o)|mlp/(up|gate|down))")
_STATIC_FIELDS = ("method", "bits", "granularity", "group_size", "shape", "dtype")


def _pallas_module():
    # Imported lazily: the float model never needs Pallas.
    from pallas import quantized_matmul

    return quantized_matmul


def _pallas_tpu_module():
    from pallas import quantized_matmul_tpu

    return quantized_matmul_tpu


def check_kernel(kernel: str) -> str:
    """Returns `kernel` if it names a packed-matmul kernel (one of KERNELS), else raises."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown packed-matmul kernel {kernel!r}; expected one of {KERNELS}")
    return kernel


def packed_matmul(x: jax.Array, packed: PackedWeight, kernel: str = "auto") -> jax.Array:
    """`x @ unpack(packed)` in x's dtype.

    Args:
      x: activations `(..., in_features)`.
      packed: one matrix (inside the decoder's scan, the layer's slice of a stacked weight).
      kernel: "auto" (the Pallas kernel of the platform the program is compiled for: Triton on
        a CUDA GPU, Mosaic on a TPU where it tiles the format; XLA's dequantize-then-dot
        elsewhere), "pallas" (the Triton kernel, compiled for the GPU), "interpret" (the same
        kernel in Pallas interpret mode: CPU tests), "pallas_tpu" and "interpret_tpu" (the TPU
        kernel, `pallas.quantized_matmul_tpu`, compiled or interpreted) or "xla"
        (`quantized_matmul_reference`: unpack, then XLA's dot).

    Returns:
      `(..., out_features)` in x's dtype.
    """
    kernels = _pallas_module()
    check_kernel(kernel)
    if kernel == "xla":
        return kernels.quantized_matmul_reference(x, packed)
    if kernel.endswith("_tpu"):
        tpu = _pallas_tpu_module()
        return tpu.quantized_matmul(x, packed, interpret=kernel == "interpret_tpu")
    if kernel == "auto":
        # Chosen when the program is lowered, for the platform it is lowered for (not the
        # host's default backend): a program compiled for a GPU or a TPU from a CPU host, or
        # exported for several, runs that platform's kernel. Every branch is traced, so the
        # TPU branch must not raise for a format its kernel does not tile: it falls back to
        # the reference there. Interpret mode is a test tool, never chosen.
        tpu = _pallas_tpu_module()
        tpu_matmul = (
            tpu.quantized_matmul if tpu.supports(packed) else kernels.quantized_matmul_reference
        )
        return jax.lax.platform_dependent(
            x,
            packed,
            cuda=kernels.quantized_matmul,
            tpu=tpu_matmul,
            default=kernels.quantized_matmul_reference,
        )
    return kernels.quantized_matmul(x, packed, interpret=kernel == "interpret")


def _spec_tree(params: Params, rules_or_specs: Any) -> Params:
    if isinstance(rules_or_specs, QuantSpec):
        rules_or_specs = rules.default_rules(rules_or_specs)
    if isinstance(rules_or_specs, Mapping):
        return rules_or_specs
    return rules.resolve(params, rules_or_specs)


_pack = jax.jit(qtensor.pack, static_argnums=(1,))
_fake_quantize = jax.jit(quantizers.fake_quantize, static_argnums=(1,))


def export_packed(params: Params, rules_or_specs: Any) -> Params:
    """Packs every quantized block linear of a float or QAT parameter pytree.

    Args:
      params: the decoder's parameters (latent float weights; PACT+ kernels with their learned
        "quant_scale" siblings, see `rules.add_learned_scales`).
      rules_or_specs: ordered (regex, QuantSpec | None) rules, a spec tree from
        `rules.resolve`, or one QuantSpec (shorthand for `rules.default_rules(spec)`).

    Returns:
      A new pytree: each quantized `layers/<name>/kernel` becomes `layers/<name>/packed` (a
      stacked PackedWeight), "quant_scale" leaves are dropped, and a kernel a rule quantizes
      outside the blocks (which the decoder does not multiply through `linear()`) is stored
      fake-quantized in float, so the model computes what QAT trained either way.

    Raises:
      ValueError: a spec does not suit its parameter (the message names the path).
    """
    specs = _spec_tree(params, rules_or_specs)

    def convert(node: Params, spec_node: Any, prefix: str) -> Params:
        out = {}
        for key, value in node.items():
            if key == rules.SCALE_NAME:
                continue
            path = f"{prefix}{key}"
            spec = spec_node.get(key) if isinstance(spec_node, Mapping) else None
            if isinstance(value, Mapping):
                out[key] = convert(value, spec, path + "/")
            elif isinstance(spec, QuantSpec):
                quantizers.check_shape(spec, value.shape, where=path)
                gamma = node.get(rules.SCALE_NAME) if spec.method == "pact" else None
                if key == "kernel" and _BLOCK_LINEAR.fullmatch(prefix.rstrip("/")):
                    out[PACKED] = _pack(value, spec, gamma)
                else:
                    out[key] = _fake_quantize(value, spec, gamma)
            else:
                out[key] = value
        return out

    return convert(params, specs, "")


def _walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested dict, PackedWeights kept whole."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _walk(value, path + "/")
        else:
            yield path, value


def weight_bytes(params: Params) -> dict[str, int]:
    """Bytes of a packed model's weights against the same model stored in bfloat16.

    Args:
      params: a packed model (from `export_packed` or `load_packed`).

    Returns:
      "packed_linear": bytes of the PackedWeights (codes, scales, zero points, padding
      included); "bf16_linear": the same matrices in bf16; "other_bf16": every other floating
      leaf in bf16 (embeddings, norms, biases, head, kept in float by the packed model);
      "packed_model" and "bf16_model": the totals.
    """
    totals = {"packed_linear": 0, "bf16_linear": 0, "other_bf16": 0}
    for _, leaf in _walk(params):
        if isinstance(leaf, PackedWeight):
            totals["packed_linear"] += leaf.nbytes
            totals["bf16_linear"] += qtensor.dense_nbytes(leaf, jnp.bfloat16)
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            totals["other_bf16"] += int(leaf.size) * 2
    totals["packed_model"] = totals["packed_linear"] + totals["other_bf16"]
    totals["bf16_model"] = totals["bf16_linear"] + totals["other_bf16"]
    return totals


class PackedModel(NamedTuple):
    """What `load_packed` returns: the packed parameters and, if it was saved, the ModelSpec."""

    params: Params
    spec: Any


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """Which tokenizer a packed model was exported with: its vocabulary size and the sha256 of
    its vocabulary (the sorted token -> id items as JSON), so another tokenizer of the same size
    is told apart too."""

    vocab_size: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.vocab_size} tokens, vocabulary sha256 {self.sha256[:12]}"


def tokenizer_identity(tokenizer: Any) -> TokenizerIdentity | None:
    """The identity of a Hugging Face tokenizer (anything with `get_vocab()`) or of
    `named.ByteTokenizer` (ids are byte values); None for anything else."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        vocab = {str(token): int(index) for token, index in get_vocab().items()}
    elif type(tokenizer).__name__ == "ByteTokenizer":  # named.ByteTokenizer, not imported here
        vocab = {f"<byte {i}>": i for i in range(256)}
    else:
        return None
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return TokenizerIdentity(len(vocab), hashlib.sha256(text.encode("utf-8")).hexdigest())


def save_packed(path: str, params: Params, model_spec: Any = None, tokenizer: Any = None) -> None:
    """Writes a packed model to one safetensors file.

    Tensors are named by their "/"-joined path; a PackedWeight at `P` is stored as `P.codes`,
    `P.scales` and `P.zeros` (asym only), and its static fields (method, bits, granularity,
    group size, shape, dtype) go to the file's metadata as JSON, with the ModelSpec, so the file
    is self-describing. Safetensors rather than orbax: one flat, memory-mappable file that other
    runtimes can read.

    Args:
      path: the file to write.
      params: a packed model from `export_packed`.
      model_spec: the architecture (a `models.ModelSpec`), stored for `load_packed`.
      tokenizer: the model's tokenizer, whose identity (`tokenizer_identity`) is stored for
        `packed_tokenizer`, so `eval.py --packed` can refuse another one; None stores none.
    """
    from safetensors import flax as safetensors_flax

    tensors, packed_meta = {}, {}
    for name, leaf in _walk(params):
        if isinstance(leaf, PackedWeight):
            tensors[f"{name}.codes"] = leaf.codes
            tensors[f"{name}.scales"] = leaf.scales
            if leaf.zeros is not None:
                tensors[f"{name}.zeros"] = leaf.zeros
            packed_meta[name] = {field: getattr(leaf, field) for field in _STATIC_FIELDS}
        else:
            tensors[name] = jnp.asarray(leaf)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "packed": json.dumps(packed_meta),
        "model_spec": json.dumps(dataclasses.asdict(model_spec)) if model_spec else "",
    }
    identity = tokenizer_identity(tokenizer) if tokenizer is not None else None
    if identity is not None:
        metadata["tokenizer_vocab_size"] = str(identity.vocab_size)
        metadata["tokenizer_sha256"] = identity.sha256
    safetensors_flax.save_file(tensors, path, metadata=metadata)


def load_packed(path: str) -> PackedModel:
    """Reads a packed model written by `save_packed`.

    Args:
      path: the safetensors file.

    Returns:
      `PackedModel(params, spec)`: the nested parameter dict with PackedWeights in place, ready
      for `decoder.forward(params, tokens, spec)`, and the saved ModelSpec (None if none was).

    Raises:
      ValueError: the file is not a tsld-jax packed model, or is not a readable safetensors
        file (random bytes, cut short).
    """
    from safetensors import SafetensorError
    from safetensors import flax as safetensors_flax

    metadata = _metadata(path)
    try:
        tensors = safetensors_flax.load_file(path)
        packed_meta = json.loads(metadata["packed"])
    except (SafetensorError, json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{path}: unreadable packed file ({error})") from None

    params: Params = {}

    def put(name: str, value: Any) -> None:
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    for name, fields in packed_meta.items():
        fields = dict(fields, shape=tuple(fields["shape"]))
        put(
            name,
            PackedWeight(
                codes=tensors.pop(f"{name}.codes"),
                scales=tensors.pop(f"{name}.scales"),
                zeros=tensors.pop(f"{name}.zeros", None),
                **fields,
            ),
        )
    for name, value in tensors.items():
        put(name, value)
    return PackedModel(params, _model_spec(metadata.get("model_spec", "")))


def packed_tokenizer(path: str) -> TokenizerIdentity | None:
    """The identity of the tokenizer a packed file was saved with; None for a file saved
    without one (by `save_packed(..., tokenizer=None)`, or before files carried it).

    Raises:
      ValueError: as `load_packed`.
    """
    metadata = _metadata(path)
    size, digest = metadata.get("tokenizer_vocab_size"), metadata.get("tokenizer_sha256")
    if not size or not digest:
        return None
    try:
        return TokenizerIdentity(int(size), digest)
    except ValueError:
        raise ValueError(f"{path}: unreadable tokenizer size {size!r} in its metadata") from None


def _metadata(path: str) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="flax") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path}: unreadable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (metadata: {sorted(metadata)})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format version {metadata.get('format_version')}")
    return metadata


def _model_spec(text: str):
    if not text:
        return None
    from tsld_jax.models.spec import ModelSpec

    fields = json.loads(text)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return ModelSpec(**fields)

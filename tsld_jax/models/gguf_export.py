"""Our parameter pytree out to GGUF files that llama.cpp runs: F32, F16, and ternary TQ2_0/TQ1_0.

Metadata keys and tensor names are those llama.cpp's own `convert_hf_to_gguf.py` writes for the
family's architecture (`families/<family>.py`: llama, gpt2, qwen2, qwen3, gemma3, phi3;
llama.cpp has no OPT or GPT-Neo graph, so those are refused, as is any spec whose arithmetic
llama.cpp's graph for it would not reproduce).
The names come from the `gguf` package's constants, the writing from its `GGUFWriter` and the
block quantization from `gguf.quants`, the same code the converter uses.

Which type each tensor gets:

- 1-D tensors (norms, biases): F32, as the converter writes them.
- A quantized block linear in a ternary format: TQ2_0 or TQ1_0 when every 256-weight block of
  its rows holds one magnitude (TQ types store one float16 scale per block of 256). That is the
  case for per-channel and per-tensor ternary weights whose rows (input features) are a
  multiple of 256, and for per-group ones whose groups are a multiple of 256. Otherwise Q8_0
  (one float16 scale per 32 weights), which holds the same ternary values exactly when every
  32-weight block holds one magnitude; it costs 8.5 bits per weight against 2.0625 (TQ2_0)
  and 1.6875 (TQ1_0), and the export reports those bytes. A ternary layer that neither type
  holds exactly is refused (`ExportError`), never approximated.
- In the gguf-q8_0 format, every other matrix whose rows are a multiple of 32: Q8_0, rounded
  as llama.cpp's converter does (a ternary layer only where that is exact).
- Everything else: F16 (F32 in the gguf-f32 format).

After quantizing, each ternary tensor is dequantized again with `gguf.quants.dequantize` and
compared with our fake-quantized weights: they must agree up to the float16 rounding of the
scale (relative error <= 2**-11), or the export fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tsld_jax.models import families
from tsld_jax.models import gguf as gguf_import
from tsld_jax.models.spec import ModelSpec

FORMATS = ("gguf-tq2_0", "gguf-tq1_0", "gguf-q8_0", "gguf-f16", "gguf-f32")
TERNARY_FORMATS = ("gguf-tq2_0", "gguf-tq1_0")
# Relative rounding error of a float16 scale (round to nearest, 10 explicit mantissa bits),
# with a little room for the float32 product of Q8_0's d * 127.
_F16_RELATIVE = 2.0**-11 * (1.0 + 1e-3)
_F16_MAX = 65504.0
_F16_MIN_NORMAL = 2.0**-14  # below this a float16 scale loses relative precision
_TQ_BLOCK = 256
_Q8_BLOCK = 32
_BITS_PER_WEIGHT = {"TQ2_0": 2.0625, "TQ1_0": 1.6875, "Q8_0": 8.5, "F16": 16.0, "F32": 32.0}

Vocab = Callable[[Any], None]  # writes the tokenizer.* keys into a GGUFWriter


class ExportError(ValueError):
    """A model or a request that cannot be written exactly; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor of a written file.

    Attributes:
      name: the GGUF tensor name.
      shape: numpy (row-major) shape; rows are output features.
      qtype: "F32", "F16", "Q8_0", "TQ2_0" or "TQ1_0".
      nbytes: bytes in the file (without alignment padding).
      ternary: a quantized block linear.
      note: why a ternary tensor is not in the requested ternary type.
    """

    name: str
    shape: tuple[int, ...]
    qtype: str
    nbytes: int
    ternary: bool
    note: str = ""


@dataclasses.dataclass
class ExportReport:
    """What `write_gguf` wrote: the file, its format, and every tensor's type and size."""

    path: str
    format: str
    tensors: list[TensorRecord]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """{qtype: (number of tensors, bytes)}."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            count, size = out.get(t.qtype, (0, 0))
            out[t.qtype] = (count + 1, size + t.nbytes)
        return out

    def fallback_cost(self) -> tuple[int, int]:
        """(bytes of ternary tensors written as Q8_0, bytes they would take in the TQ type)."""
        target = {"gguf-tq2_0": "TQ2_0", "gguf-tq1_0": "TQ1_0"}.get(self.format)
        if target is None:
            return 0, 0
        fallback = [t for t in self.tensors if t.ternary and t.qtype == "Q8_0"]
        weights = sum(int(np.prod(t.shape)) for t in fallback)
        return sum(t.nbytes for t in fallback), int(weights * _BITS_PER_WEIGHT[target] / 8)

    def summary(self) -> str:
        """The split, one line per type and per fallback reason, for the command line."""
        lines = [f"wrote {self.path} ({self.format}): {self.total_bytes:,} bytes of tensors"]
        for qtype, (count, size) in sorted(self.bytes_by_type().items()):
            lines.append(f"  {qtype:6s} {count:4d} tensors {size:14,d} bytes")
        ternary = [t for t in self.tensors if t.ternary]
        for qtype in sorted({t.qtype for t in ternary}):
            names = sorted({_short(t.name) for t in ternary if t.qtype == qtype})
            lines.append(f"  ternary as {qtype}: {', '.join(names)}")
        for note in sorted({t.note for t in ternary if t.note}):
            names = sorted({_short(t.name) for t in ternary if t.note == note})
            lines.append(f"  Q8_0 because {note}: {', '.join(names)}")
        fallback, would_be = self.fallback_cost()
        if fallback:
            target = self.format[5:].upper()
            lines.append(
                f"  Q8_0 fallback: {fallback:,} bytes, {fallback - would_be:,} more than the same "
                f"weights at {target}'s {_BITS_PER_WEIGHT[target]} bits per weight"
            )
        return "\n".join(lines)


def _short(name: str) -> str:
    # "blk.3.attn_q.weight" -> "attn_q": the split is the same in every block.
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


# --- Tensor layout: our pytree -> (GGUF name, numpy array in the converter's layout) -----------


@dataclasses.dataclass
class _Tensor:
    name: str
    array: np.ndarray  # float32, rows = output features for matrices
    ternary: bool = False
    group_size: int | None = None  # per-group quantizers: input features per scale


def _quant_spec(specs: Mapping[str, Any] | None, path: str):
    from tsld_jax.quant.quantizers import QuantSpec

    spec = _get(specs, path) if specs is not None else None
    return spec if isinstance(spec, QuantSpec) else None


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _model_tensors(
    params: Mapping[str, Any], spec: ModelSpec, specs: Mapping[str, Any] | None
) -> Iterator[_Tensor]:
    """Every tensor of the file, in the converter's layout, from `gguf.leaf_sources`: the same
    walk over our pytree that the import makes, so the two cannot drift apart."""
    arch = families.get(spec.family).gguf
    fused = gguf_import.fused_parts(spec)
    heads = {"attn/q": spec.num_heads, "attn/k": spec.num_kv_heads}
    pending: dict[str, list[tuple[str, np.ndarray, Any]]] = {}  # fused tensor -> its parts
    sources = list(gguf_import.leaf_sources(spec))
    per_layer = [s for s in sources if s[3]]
    top = {s[1]: s for s in sources if not s[3]}

    def one(leaf_path, module, suffix, layer) -> Iterator[_Tensor]:
        value = _get(params, "/".join(leaf_path))
        value = np.asarray(value if layer is None else value[layer], np.float32)
        qspec = _quant_spec(specs, "/".join(leaf_path)) if leaf_path[-1] == "kernel" else None
        if leaf_path[-1] == "kernel":
            value = value.T  # GGUF rows are output features
        if leaf_path[-1] == "scale" and spec.norm_offset:
            value = value + np.float32(spec.norm_offset)  # llama.cpp multiplies by the stored w
        if arch.permute_rotary and module in heads:
            value = gguf_import.permute_rotary(value, heads[module])
        if module in fused:
            holder, _, _ = fused[module]
            key = f"{gguf_import._fused_tensor_name(holder.name, layer)}.{suffix}"
            pending.setdefault(key, []).append((module, value, qspec))
            if len(pending[key]) == len(holder.parts):  # in the stored order, not the pytree's
                parts = sorted(pending.pop(key), key=lambda part: holder.parts.index(part[0]))
                yield _joined(key, parts)
            return
        name = f"{gguf_import.tensor_name(module, layer)}.{suffix}"
        yield _Tensor(
            name,
            value,
            ternary=qspec is not None,
            group_size=qspec.group_size if qspec is not None else None,
        )

    for module in ("embed/tokens", "positions"):
        if module in top:
            yield from one(top[module][0], module, top[module][2], None)
    for i in range(spec.num_layers):
        for leaf_path, module, suffix, _ in per_layer:
            yield from one(leaf_path, module, suffix, i)
    for leaf_path, module, suffix, _ in sources:
        if module in ("final_norm", "lm_head"):
            # A tied head is absent: llama.cpp then multiplies by token_embd, as the converter
            # leaves it for tied Hugging Face checkpoints.
            yield from one(leaf_path, module, suffix, None)
    for name, value in (arch.extra_tensors(spec) if arch.extra_tensors else {}).items():
        yield _Tensor(name, np.asarray(value, np.float32))


def _joined(name: str, parts: list[tuple[str, np.ndarray, Any]]) -> _Tensor:
    """One fused GGUF tensor (GPT-2's and Phi-3's attn_qkv, Phi-3's gate|up ffn_up)."""
    qspecs = [qspec for _, _, qspec in parts]
    if any(q != qspecs[0] for q in qspecs):
        modules = ", ".join(module for module, _, _ in parts)
        raise ExportError(
            f"{name}: llama.cpp reads {modules} as one matrix, which needs one quantizer for all"
        )
    qspec = qspecs[0]
    return _Tensor(
        name,
        np.concatenate([value for _, value, _ in parts], axis=0),
        ternary=qspec is not None,
        group_size=qspec.group_size if qspec is not None else None,
    )


def check_supported(spec: ModelSpec) -> None:
    """Raises ExportError unless llama.cpp has a graph for exactly this architecture."""
    arch = families.get(spec.family).gguf
    if arch is None:
        supported = sorted({f.gguf.arch for f in map(families.get, families.names()) if f.gguf})
        raise ExportError(
            f"llama.cpp has no architecture for the {spec.family} family (GGUF export "
            f"supports {', '.join(supported)}); use --format hf or packed"
        )
    try:
        arch.check(spec)
    except ValueError as error:
        raise ExportError(f"{error}; use --format hf or packed") from None


# --- Types -------------------------------------------------------------------------------------


def _single_magnitude(rows: np.ndarray, block: int) -> bool:
    """Every `block` consecutive weights of every row hold one nonzero magnitude (or none)."""
    if rows.shape[-1] % block:
        return False
    magnitude = np.abs(rows).reshape(rows.shape[0], -1, block)
    top = magnitude.max(axis=-1, keepdims=True)
    return bool(np.all((magnitude == top) | (magnitude == 0)))


def _ternary_type(tensor: _Tensor, target: str) -> tuple[str, str]:
    """(qtype, note) for a ternary tensor in a TQ format; raises if no type holds it exactly."""
    row = tensor.array.shape[-1]
    if _single_magnitude(tensor.array, _TQ_BLOCK):
        return target, ""
    if row % _TQ_BLOCK:
        note = f"rows of {row} weights are not a multiple of {_TQ_BLOCK}"
    elif tensor.group_size:
        note = f"scale groups of {tensor.group_size} straddle {_TQ_BLOCK}-weight blocks"
    else:
        note = f"a {_TQ_BLOCK}-weight block holds more than one magnitude"
    if _single_magnitude(tensor.array, _Q8_BLOCK):
        return "Q8_0", note
    raise ExportError(
        f"{tensor.name}: its ternary scales cannot be stored exactly in GGUF ({note}, and a "
        f"{_Q8_BLOCK}-weight Q8_0 block holds more than one magnitude); use --format hf or packed"
    )


def _check_float16(tensor: _Tensor) -> None:
    if np.abs(tensor.array).max(initial=0.0) > _F16_MAX:
        raise ExportError(f"{tensor.name}: values beyond float16's range; use --format gguf-f32")


def _quantize_exactly(tensor: _Tensor, qtype_name: str) -> np.ndarray:
    """gguf's quantization of a ternary tensor, verified to dequantize to the same weights."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    values = np.ascontiguousarray(tensor.array, dtype=np.float32)
    nonzero = np.abs(values[values != 0])
    if nonzero.size and (nonzero.min() < _F16_MIN_NORMAL * 127 or nonzero.max() > _F16_MAX):
        raise ExportError(
            f"{tensor.name}: ternary scales outside float16's normal range "
            f"[{nonzero.min():.3g}, {nonzero.max():.3g}] cannot be stored exactly"
        )
    data = gguf.quants.quantize(values, qtype)
    back = gguf.quants.dequantize(data, qtype).reshape(values.shape)
    error = np.abs(back - values)
    if not np.all(error <= _F16_RELATIVE * np.abs(values)):
        worst = float((error / np.maximum(np.abs(values), 1e-30)).max())
        raise ExportError(
            f"{tensor.name}: {qtype_name} does not reproduce the ternary weights "
            f"(relative error {worst:.3g} > float16 rounding)"
        )
    return data


# --- Metadata ----------------------------------------------------------------------------------


def _context_length(spec: ModelSpec, hf_config: Mapping[str, Any]) -> int:
    if spec.positional == "learned":
        return spec.max_positions - spec.position_offset
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if hf_config.get(key):
            return int(hf_config[key])
    return 2048


def _write_hparams(writer, spec: ModelSpec, hf_config: Mapping[str, Any], file_type: int) -> None:
    import gguf

    writer.add_type("model")
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(_context_length(spec, hf_config))
    writer.add_embedding_length(spec.hidden_size)
    # The converter writes 4 * n_embd for GPT-2; the real width is the same for every GPT-2
    # checkpoint that has no n_inner, and right for the ones that do.
    writer.add_feed_forward_length(spec.mlp_size)
    writer.add_head_count(spec.num_heads)
    if spec.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(spec.norm_eps)
    else:
        writer.add_layer_norm_eps(spec.norm_eps)
    if spec.positional == "rotary":
        writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_vocab_size(spec.vocab_size)
        writer.add_rope_dimension_count(spec.head_dim)
    hparams = families.get(spec.family).gguf.hparams
    if hparams is not None:
        hparams(writer, spec)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- Vocabularies ------------------------------------------------------------------------------


def vocab_from_gguf(path: str) -> Vocab:
    """Carries every `tokenizer.*` key of a GGUF file over as it is (types included)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub_type))
    if not any(key == "tokenizer.ggml.model" for key, *_ in fields):
        raise ExportError(f"{path}: the GGUF file carries no tokenizer to copy")

    def write(writer) -> None:
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type)

    return write


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order.

    The alphabet of byte-level BPE vocabularies (and so of llama.cpp's "gpt2" tokenizer model);
    written here because the tokenizers package keeps it private.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def vocab_from_bytes(vocab_size: int) -> Vocab:
    """The byte tokenizer of random models (id = byte value) as a llama.cpp "gpt2" vocabulary.

    A byte-level BPE with no merges tokenizes text into its bytes, which is what the byte
    tokenizer does. llama.cpp insists on a merges list, so it gets one that can never apply
    (a letter and a digit, which GPT-2's pre-tokenizer always splits apart). Hugging Face's BPE
    rejects a merge whose result is not a token, so `gguf.load_tokenizer` recognises this
    vocabulary and returns the byte tokenizer instead.
    """
    import gguf

    if vocab_size < 256:
        raise ExportError(f"a byte vocabulary needs 256 tokens, the model has {vocab_size}")
    tokens = byte_alphabet() + [f"[PAD{i}]" for i in range(256, vocab_size)]
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.UNUSED] * (vocab_size - 256)

    def write(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(["a 1"])
        writer.add_add_bos_token(False)

    return write


# llama.cpp's name of a byte-level BPE pre-tokenizer that splits with this regex first (its
# `llama-vocab.cpp` holds the same expressions, keyed by these names).
_SPLIT_REGEXES = {
    # Qwen2 / Qwen2.5 / Qwen3 (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): single digits.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Llama 3: digits in groups of up to three.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _pre_tokenizer_name(tokenizer_json: Mapping[str, Any]) -> str:
    # llama.cpp names its pre-tokenizers; the converter recognises them by hashing a test
    # string's tokens against a table of known checkpoints. We recognise the layouts we can
    # name without that table: GPT-2's byte-level pre-tokenizer with its own regex, and a split
    # by Qwen2's or Llama 3's regex followed by a byte-level mapping without one.
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[0].get("behavior") == "Isolated"
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        name = _SPLIT_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({pre.get('type', 'none')}) is none of GPT-2's, Qwen2's "
        "or Llama 3's byte-level ones, the kinds this exporter can name for llama.cpp; export "
        "from the model's GGUF file, or use --format hf"
    )


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int) -> Vocab:
    """A Hugging Face fast byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary.

    The tokens, their types and the padding of missing ids follow the converter's
    `get_vocab_base`; merges and special tokens come from `gguf.SpecialVocab`, as there.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
            "llama.cpp needs a BPE vocabulary"
        )
    tokenizer_json = json.loads(backend.to_str())
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise ExportError("only BPE tokenizers can be written for llama.cpp")
    pre = _pre_tokenizer_name(tokenizer_json)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids beyond the model's {vocab_size} embeddings")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError("the BPE tokenizer has no merges to write")

    def write(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return write


# --- Writing -----------------------------------------------------------------------------------


def _file_type(fmt: str) -> int:
    import gguf

    return {
        "gguf-f32": gguf.LlamaFileType.ALL_F32,
        "gguf-f16": gguf.LlamaFileType.MOSTLY_F16,
        "gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "gguf-tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
        "gguf-tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
    }[fmt]


def write_gguf(
    path: str,
    params: Mapping[str, Any],
    spec: ModelSpec,
    *,
    fmt: str,
    vocab: Vocab,
    hf_config: Mapping[str, Any] | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    name: str = "",
) -> ExportReport:
    """Writes a model as a GGUF file that llama.cpp runs.

    Args:
      path: the .gguf file to write.
      params: the decoder's parameters (latent weights of a QAT run, or float weights).
      spec: the architecture (a family with a llama.cpp architecture).
      fmt: one of FORMATS.
      vocab: writes the tokenizer keys (`vocab_from_gguf`, `vocab_from_tokenizer`,
        `vocab_from_bytes`).
      hf_config: the model's config.json dict (for the context length), if any.
      rules: the quantization rules the weights were trained or are to be quantized with; the
        quantized block linears are written fake-quantized (ternary types in TQ formats).
        None for a float model.
      name: general.name.

    Returns:
      The report of every tensor's type and size.

    Raises:
      ExportError: the architecture, a quantizer or a value cannot be written exactly.
    """
    import gguf

    from tsld_jax.quant import rules as rules_lib

    if fmt not in FORMATS:
        raise ExportError(f"unknown GGUF format {fmt!r}; expected one of {FORMATS}")
    check_supported(spec)
    specs = None
    if rules is not None:
        try:
            specs = rules_lib.resolve(params, rules)
            params = rules_lib.quantize_params(params, rules)
        except ValueError as error:
            raise ExportError(str(error)) from None
    elif fmt in TERNARY_FORMATS:
        raise ExportError(f"{fmt} needs ternary weights: a QAT checkpoint, or --quant twn")
    target = {"gguf-tq2_0": "TQ2_0", "gguf-tq1_0": "TQ1_0"}.get(fmt)

    writer = gguf.GGUFWriter(path, families.get(spec.family).gguf.arch)
    writer.add_name(name or "tsld-jax export")
    _write_hparams(writer, spec, hf_config or {}, int(_file_type(fmt)))
    vocab(writer)
    records = []
    for tensor in _model_tensors(params, spec, specs):
        tensor.array = np.ascontiguousarray(tensor.array, dtype=np.float32)
        note = ""
        if tensor.array.ndim == 1 or fmt == "gguf-f32":
            qtype, data = "F32", tensor.array
        elif tensor.ternary and target is not None:
            qtype, note = _ternary_type(tensor, target)
            data = _quantize_exactly(tensor, qtype)
        elif fmt == "gguf-q8_0" and tensor.array.shape[-1] % _Q8_BLOCK == 0:
            # Ternary layers must come out exact (one magnitude per 32-weight block, as
            # per-channel scales are); float ones are rounded as the converter's q8_0 does.
            qtype = "Q8_0"
            if tensor.ternary:
                if not _single_magnitude(tensor.array, _Q8_BLOCK):
                    raise ExportError(
                        f"{tensor.name}: a {_Q8_BLOCK}-weight Q8_0 block holds more than one "
                        "ternary magnitude; use --format hf or packed"
                    )
                data = _quantize_exactly(tensor, qtype)
            else:
                _check_float16(tensor)
                data = gguf.quants.quantize(tensor.array, gguf.GGMLQuantizationType.Q8_0)
        else:
            _check_float16(tensor)
            qtype, data = "F16", tensor.array.astype(np.float16)
        if qtype in ("F32", "F16"):
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(
                tensor.name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype)
            )
        records.append(
            TensorRecord(
                tensor.name,
                tuple(tensor.array.shape),
                qtype,
                int(data.nbytes),
                tensor.ternary,
                note,
            )
        )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return ExportReport(os.path.abspath(path), fmt, records)

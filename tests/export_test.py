"""Packed models: their logits equal the fake-quantized model's; save/load; weight bytes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import export, qtensor, rules
from tsld_jax.quant.quantizers import QuantSpec

LLAMA = ModelSpec(
    family="llama", vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, mlp_size=96, norm="rmsnorm", activation="silu", gated_mlp=True,
    positional="rotary", attn_bias=False, attn_out_bias=False, mlp_bias=False,
    tie_embeddings=False,
)  # fmt: skip
GPT2 = ModelSpec(
    family="gpt2", vocab_size=61, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
    head_dim=12, mlp_size=80, max_positions=32,
)  # fmt: skip


def _model(spec, seed, dtype=jnp.float32):
    params = decoder.init_params(jax.random.key(seed), spec)
    # Non-zero biases and norms, so a mixed-up layer cannot hide.
    params = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), params
    )
    tokens = jax.random.randint(jax.random.key(seed + 2), (2, 9), 0, spec.vocab_size)
    return jax.tree.map(lambda a: a.astype(dtype), params), tokens


def _logits(params, tokens, spec, quantizer=None, packed_kernel="auto"):
    return jax.jit(
        lambda p, t: decoder.forward(p, t, spec, quantizer=quantizer, packed_kernel=packed_kernel)
    )(params, tokens)


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# One case runs the Pallas kernel inside the decoder (natively on a GPU, at the float32 that
# conftest pins there; in interpret mode elsewhere, slow to compile on CPU); the others use the
# XLA dequantize-then-dot path, which is the kernel's reference.
IN_MODEL_KERNEL = "pallas" if jax.default_backend() == "gpu" else "interpret"
CASES = [
    (LLAMA, QuantSpec("twn", 2, "channel"), IN_MODEL_KERNEL),
    (GPT2, QuantSpec("asym", 4, "group", 16), "xla"),
    (LLAMA, QuantSpec("sym", 8, "channel"), "xla"),
    (GPT2, QuantSpec("pact", 2, "channel"), "xla"),
    (GPT2, QuantSpec("twn", 2, "tensor"), "xla"),
]


@pytest.mark.parametrize(
    ("model_spec", "quant_spec", "kernel"),
    CASES,
    ids=[f"{m.family}-{q.method}{q.bits}-{q.granularity}-{k}" for m, q, k in CASES],
)
def test_packed_logits_equal_fake_quantized(model_spec, quant_spec, kernel):
    params, tokens = _model(model_spec, seed=len(CASES) + hash(quant_spec) % 1000)
    quant_rules = rules.default_rules(quant_spec)
    if quant_spec.method == "pact":  # learned gammas away from 1, as after QAT
        params = rules.add_learned_scales(params, quant_rules, init_scale=1.3)
    expected = _logits(params, tokens, model_spec, rules.make_quantizer(quant_rules))
    packed = export.export_packed(params, quant_rules)
    assert "kernel" not in packed["layers"]["attn"]["q"]
    assert isinstance(packed["layers"]["mlp"]["down"]["packed"], qtensor.PackedWeight)
    actual = _logits(packed, tokens, model_spec, packed_kernel=kernel)
    assert _relative_error(actual, expected) < 1e-5


def test_bf16_model():
    params, tokens = _model(LLAMA, seed=3, dtype=jnp.bfloat16)
    spec = QuantSpec("twn", 2, "channel")
    expected = _logits(params, tokens, LLAMA, rules.make_quantizer(spec))
    # The kernel's bf16 path is tested in its own module.
    actual = _logits(export.export_packed(params, spec), tokens, LLAMA, packed_kernel="xla")
    assert actual.dtype == jnp.bfloat16
    assert _relative_error(actual, expected) < 2e-2


def test_save_load_round_trip(tmp_path):
    params, tokens = _model(GPT2, seed=5)
    packed = export.export_packed(params, QuantSpec("asym", 4, "group", 16))
    path = str(tmp_path / "model.safetensors")
    export.save_packed(path, packed, GPT2)
    loaded, spec = export.load_packed(path)
    assert spec == GPT2
    assert jax.tree.structure(loaded) == jax.tree.structure(packed)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(packed), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(_logits(loaded, tokens, spec)), np.asarray(_logits(packed, tokens, GPT2))
    )
    with pytest.raises(ValueError, match="not a tsld-jax-packed file"):
        from safetensors import flax as safetensors_flax

        other = str(tmp_path / "other.safetensors")
        safetensors_flax.save_file({"a": jnp.ones(2)}, other)
        export.load_packed(other)


def test_packed_file_carries_its_tokenizer(tmp_path):
    from tsld_jax.models import named

    params, _ = _model(GPT2, seed=5)
    packed = export.export_packed(params, QuantSpec("twn", 2, "channel"))

    class Words:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    path = str(tmp_path / "model.safetensors")
    export.save_packed(path, packed, GPT2, Words({"a": 0, "b": 1}))
    identity = export.packed_tokenizer(path)
    assert identity == export.tokenizer_identity(Words({"b": 1, "a": 0}))  # order-free
    assert identity.vocab_size == 2
    assert identity != export.tokenizer_identity(Words({"a": 1, "b": 0}))  # same size, not ids
    assert export.tokenizer_identity(named.ByteTokenizer()).vocab_size == 256
    # A file without one (saved so, or older) still loads, and says it has none.
    export.save_packed(path, packed, GPT2)
    assert export.packed_tokenizer(path) is None
    assert export.load_packed(path).spec == GPT2


def test_weight_bytes_and_other_rules():
    params, tokens = _model(GPT2, seed=6)
    quant_rules = ((rules.BLOCK_LINEAR_KERNELS, QuantSpec("twn", 2, "channel")),) + (
        (r"lm_head/kernel|embed/tokens", QuantSpec("sym", 8, "channel")),
        (r".*", None),
    )
    packed = export.export_packed(params, quant_rules)
    # A quantized tensor outside the block linears stays float, fake-quantized.
    np.testing.assert_array_equal(
        np.asarray(packed["embed"]["tokens"]),
        np.asarray(jax.jit(lambda w: rules.quantizers.fake_quantize(w, rules.PRESETS["sym8"]))(
            params["embed"]["tokens"]
        )),
    )  # fmt: skip
    sizes = export.weight_bytes(packed)
    linear_weights = 2 * (4 * 48 * 48 + 2 * 48 * 80)  # L * (q, k, v, o + up, down)
    assert sizes["bf16_linear"] == 2 * linear_weights
    # 2 bits a weight, K and N padded to multiples of 64 (int32 words of 16 rows), plus a
    # float32 scale a column: q/k/v/o 64x64 -> 1024 + 256 bytes, up 64x128 -> 2048 + 512, down
    # 128x64 -> 2048 + 256, two layers. (Padding dominates at this toy size only.)
    assert sizes["packed_linear"] == 2 * (4 * 1280 + 2560 + 2304)
    assert sizes["packed_model"] == sizes["packed_linear"] + sizes["other_bf16"]
    logits = _logits(packed, tokens, GPT2)  # "auto": XLA's dot on this CPU
    assert np.isfinite(np.asarray(logits)).all()


def test_kernel_choice_is_part_of_the_program():
    params, tokens = _model(LLAMA, seed=7)
    packed = export.export_packed(params, QuantSpec("twn", 2, "channel"))
    with pytest.raises(ValueError, match="unknown packed-matmul kernel"):
        _logits(packed, tokens, LLAMA, packed_kernel="cuda")
    with pytest.raises(ValueError, match="unknown packed-matmul kernel"):  # float models too
        _logits(params, tokens, LLAMA, packed_kernel="cuda")

    def calls_kernel(kernel):
        fn = jax.jit(lambda p, t: decoder.forward(p, t, LLAMA, packed_kernel=kernel))
        # The jitted kernel wrapper, not `quantized_matmul_reference`.
        return re.search(r"@quantized_matmul(_\d+)?\(", fn.lower(packed, tokens).as_text())

    # "auto" on this CPU host lowers to XLA's dot, like "xla"; interpret mode lowers the kernel
    # body into the program (a loop over its grid), so a later choice is never frozen by an
    # earlier trace. (That "auto" picks the Pallas kernel when compiled for a GPU from this CPU
    # host is checked in aot_test.py.)
    assert not calls_kernel("auto")
    assert not calls_kernel("xla")
    assert calls_kernel("interpret")
    assert not calls_kernel("auto")

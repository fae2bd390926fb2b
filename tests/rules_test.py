"""Quantization rules: the matcher, the default rule set, the decoder hook and PTQ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsld_jax import quant
from tsld_jax.models import decoder
from tsld_jax.models.spec import spec_from_hf_config
from tsld_jax.quant import quantizers, rules
from tsld_jax.quant.quantizers import QuantSpec

HF_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32),
    "opt_post_proj": dict(
        model_type="opt", vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
        num_attention_heads=2, max_position_embeddings=32, do_layer_norm_before=False,
        word_embed_proj_dim=8,
    ),
    "llama_untied": dict(
        model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
    "gpt_neo": dict(
        model_type="gpt_neo", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
        max_position_embeddings=32, attention_types=[[["global", "local"], 1]], window_size=3,
    ),
}  # fmt: skip
BLOCK_KERNELS = {f"layers/{name}/kernel" for name in decoder.LINEAR_NAMES}


def _flat_specs(params, rule_set):
    specs = rules.resolve(params, rule_set)
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: x is None)
    return {rules.path_name(path): spec for path, spec in flat}


def _model(family="llama_untied", seed=0):
    spec = spec_from_hf_config(HF_CONFIGS[family])
    params = decoder.init_params(jax.random.key(seed), spec)
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, 6), 0, spec.vocab_size)
    return spec, params, tokens


def test_first_match_wins_and_whole_path_must_match():
    rule_set = [(r"layers/mlp/down/kernel", "a"), (r"layers/.*/kernel", "b"), (r".*", "c")]
    assert rules.match("layers/mlp/down/kernel", rule_set) == "a"
    assert rules.match("layers/attn/q/kernel", rule_set) == "b"
    assert rules.match("layers/attn/q/kernel_extra", rule_set) == "c"  # fullmatch, not search
    assert rules.match("lm_head/kernel", rule_set) == "c"


def test_no_match_raises_naming_the_path():
    with pytest.raises(ValueError, match="'embed/tokens'"):
        rules.match_rules({"embed": {"tokens": jnp.zeros(3)}}, [(r"layers/.*", 1)])


def test_match_rules_serves_any_value_type():
    # The sharding rules reuse the matcher with partition specs (here: plain tuples of names).
    shapes = decoder.param_shapes(spec_from_hf_config(HF_CONFIGS["gpt2"]))
    out = rules.match_rules(shapes, [(r".*kernel", "tp"), (r".*", "replicated")])
    assert out["layers"]["mlp"]["up"]["kernel"] == "tp"
    assert out["embed"]["tokens"] == "replicated"


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_default_rules_quantize_every_block_linear_and_nothing_else(family):
    spec = spec_from_hf_config(HF_CONFIGS[family])
    flat = _flat_specs(decoder.param_shapes(spec), rules.default_rules())
    quantized = {path for path, s in flat.items() if s is not None}
    expected = {p for p in BLOCK_KERNELS if p in flat}
    assert quantized == expected
    assert len(quantized) == (7 if spec.gated_mlp else 6)
    assert all(s == rules.TWN for path, s in flat.items() if path in quantized)
    # Biases, norms, embeddings, positions, OPT's projections and the head stay float.
    for path in flat:
        if path not in quantized:
            assert not path.startswith("layers/") or not path.endswith("kernel"), path


def test_decoder_quantizer_equals_forward_on_ptq_params():
    spec, params, tokens = _model()
    for preset in ("twn", "sym8"):
        rule_set = rules.preset_rules(preset)
        qat = decoder.forward(params, tokens, spec, quantizer=rules.make_quantizer(rule_set))
        ptq = decoder.forward(rules.quantize_params(params, rule_set), tokens, spec)
        np.testing.assert_allclose(np.asarray(qat), np.asarray(ptq), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(qat), np.asarray(decoder.forward(params, tokens, spec)))


def test_quantizer_accepts_rules_spec_tree_or_single_spec():
    spec, params, tokens = _model()
    rule_set = rules.default_rules(QuantSpec("asym", 4, "group", 8))
    outputs = [
        decoder.forward(params, tokens, spec, quantizer=rules.make_quantizer(r))
        for r in (rule_set, rules.resolve(params, rule_set), QuantSpec("asym", 4, "group", 8))
    ]
    for out in outputs[1:]:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(outputs[0]))


def test_rule_order_can_exempt_a_layer():
    spec, params, tokens = _model()
    rule_set = [(r"layers/mlp/down/kernel", None), *rules.default_rules()]
    quantizer = rules.make_quantizer(rule_set)
    layer = jax.tree.map(lambda x: x[0], params["layers"])
    np.testing.assert_array_equal(
        quantizer("mlp/down", layer["mlp"]["down"]), layer["mlp"]["down"]["kernel"]
    )
    assert not np.array_equal(quantizer("mlp/up", layer["mlp"]["up"]), layer["mlp"]["up"]["kernel"])


def test_ptq_copy_quantizes_each_block_kernel_and_copies_the_rest():
    _, params, _ = _model("gpt2")
    q_spec = QuantSpec("sym", 4, "channel")
    ptq = rules.quantize_params(params, rules.default_rules(q_spec))
    flat_p = dict(_flat_specs(params, [(r".*", None)]))
    for path in flat_p:
        keys = path.split("/")
        before, after = params, ptq
        for key in keys:
            before, after = before[key], after[key]
        assert after.shape == before.shape and after.dtype == before.dtype
        if path in BLOCK_KERNELS:
            expected = quantizers.fake_quantize(before, q_spec)
            np.testing.assert_array_equal(np.asarray(after), np.asarray(expected))
            levels = np.unique(np.asarray(after)[0, :, 0])
            assert len(levels) <= 2**4 - 1
        else:
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_learned_scales_are_added_used_and_trained():
    spec, params, tokens = _model()
    rule_set = rules.preset_rules("pact2")
    with_scales = rules.add_learned_scales(params, rule_set, init_scale=0.8)
    q_layer = with_scales["layers"]["attn"]["q"]
    assert q_layer["quant_scale"].shape == (2, q_layer["kernel"].shape[-1])
    np.testing.assert_array_equal(np.asarray(q_layer["quant_scale"]), np.float32(0.8))
    assert "quant_scale" not in with_scales["embed"]
    assert rules.match_rules(with_scales, rule_set)["layers"]["attn"]["q"]["quant_scale"] is None

    quantizer = rules.make_quantizer(rule_set)
    grads = jax.grad(lambda p: decoder.forward(p, tokens, spec, quantizer=quantizer).std())(
        with_scales
    )
    for name in decoder.LINEAR_NAMES:
        group, layer = name.split("/")
        assert np.abs(np.asarray(grads["layers"][group][layer]["quant_scale"])).max() > 0, name

    ptq = rules.quantize_params(with_scales, rule_set)
    assert "quant_scale" not in ptq["layers"]["attn"]["q"]
    np.testing.assert_allclose(
        np.asarray(decoder.forward(ptq, tokens, spec)),
        np.asarray(decoder.forward(with_scales, tokens, spec, quantizer=quantizer)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_group_scales_have_one_value_per_group():
    _, params, _ = _model()
    rule_set = rules.default_rules(QuantSpec("pact", 2, "group", 8))
    scales = rules.add_learned_scales(params, rule_set)["layers"]["mlp"]["down"]["quant_scale"]
    assert scales.shape == (2, 24 // 8, 16)


def test_errors_name_the_parameter_path():
    spec, params, tokens = _model()
    with pytest.raises(
        ValueError, match=r"layers/attn/[qkvo]/kernel: group_size=128 does not divide"
    ):
        rules.quantize_params(params, rules.preset_rules("asym4"))
    with pytest.raises(ValueError, match=r"layers/attn/[qkvo]/kernel: PACT\+ needs a learned"):
        rules.quantize_params(params, rules.preset_rules("pact2"))
    with pytest.raises(ValueError, match=r"layers/attn/[qkvo]/kernel: PACT\+ needs a learned"):
        decoder.forward(
            params, tokens, spec, quantizer=rules.make_quantizer(rules.preset_rules("pact2"))
        )
    with pytest.raises(ValueError, match=r"final_norm/(scale|bias): a quantized weight must be"):
        _, gpt2_params, _ = _model("gpt2")
        rules.quantize_params(gpt2_params, [(r"final_norm/.*", rules.TWN), (r".*", None)])
    with pytest.raises(ValueError, match="unknown quantization preset"):
        rules.preset_rules("int3")


def test_presets():
    assert rules.preset_rules("twn")[0][1] == QuantSpec("twn", 2, "channel")
    assert rules.preset_rules("asym4")[0][1] == QuantSpec("asym", 4, "group", 128)
    assert rules.preset_rules("sym8")[0][1] == QuantSpec("sym", 8, "channel")
    assert quant.preset_rules is rules.preset_rules and quant.QuantSpec is QuantSpec

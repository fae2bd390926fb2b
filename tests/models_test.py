"""Logit parity of our decoder with transformers' PyTorch models, import/export round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import transformers

from tsld_jax.models import attention, decoder, hf, load_model
from tsld_jax.quant import QuantSpec, quantizers, rules

torch = pytest.importorskip("torch")  # the reference is a PyTorch model

BATCH, LENGTH = 2, 12


def _tokens_and_mask():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, tiny_models.VOCAB, size=(BATCH, LENGTH))
    mask = np.ones((BATCH, LENGTH), dtype=np.int32)
    mask[1, 8:] = 0  # right padding on the second row
    return tokens, mask


def _torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(tiny_models.CONFIGS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = tiny_models.build(request.param, str(directory))
    return request.param, str(directory), model


def test_logits_match_transformers(tiny):
    name, directory, model = tiny
    tokens, mask = _tokens_and_mask()
    loaded = load_model(directory, load_tokenizer=False)
    ours = np.asarray(decoder.forward(loaded.params, tokens, loaded.spec, mask_BxT=mask))
    theirs = _torch_logits(model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 0.5, "logits too small for the comparison to mean much"
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_query_tiles_and_joined_projections_match_transformers(tiny, monkeypatch):
    """Attention in query tiles (5, 5, 2 rows; keys cut at each tile's end) and q/k/v and
    gate/up as one matmul each (24 rows here, so FUSE_MIN_ROWS is lowered) equal the model."""
    name, directory, model = tiny
    monkeypatch.setattr(attention, "QUERY_TILE", 5)
    monkeypatch.setattr(decoder, "FUSE_MIN_ROWS", 1)
    tokens, mask = _tokens_and_mask()
    loaded = load_model(directory, load_tokenizer=False)
    ours = np.asarray(decoder.forward(loaded.params, tokens, loaded.spec, mask_BxT=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], _torch_logits(model, tokens, mask)[real], atol=1e-4)


def test_padding_does_not_change_real_logits(tiny):
    _, directory, _ = tiny
    tokens, mask = _tokens_and_mask()
    loaded = load_model(directory, load_tokenizer=False)
    padded = decoder.forward(loaded.params, tokens, loaded.spec, mask_BxT=mask)
    alone = decoder.forward(loaded.params, tokens[1:, :8], loaded.spec)
    np.testing.assert_allclose(np.asarray(padded)[1, :8], np.asarray(alone)[0], atol=1e-5)


def test_export_round_trip(tiny, tmp_path):
    _, directory, _ = tiny
    tokens, mask = _tokens_and_mask()
    loaded = load_model(directory, load_tokenizer=False)
    hf.save_hf(str(tmp_path), loaded.params, loaded.spec, loaded.hf_config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = np.asarray(decoder.forward(loaded.params, tokens, loaded.spec, mask_BxT=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens, mask)[real], ours[real], atol=1e-4)


def test_causality_via_gradients():
    spec = tiny_spec()
    params = decoder.init_params(__import__("jax").random.key(0), spec)
    import jax
    import jax.numpy as jnp

    def later_logit(embedding_rows):
        p = {**params, "embed": {"tokens": embedding_rows}}
        return decoder.forward(p, jnp.arange(6)[None] + 1, spec)[0, 2].sum()

    grad = jax.grad(later_logit)(params["embed"]["tokens"])
    # Position 2 sees tokens 1..3 (positions 0..2) but not tokens 4..6.
    assert np.abs(np.asarray(grad[4:7])).max() == 0
    assert np.abs(np.asarray(grad[1:4])).max() > 0


def tiny_spec():
    return tiny_models.llama_spec()


def test_joined_projections_quantize_each_kernel_on_its_own(tiny, monkeypatch):
    """Per-tensor TWN on q/k/v and PACT+ (learned scales) on the MLP: joining the kernels
    must keep each kernel's statistics its own, in the loss and in every gradient."""
    _, directory, _ = tiny
    loaded = load_model(directory, load_tokenizer=False)
    rule_set = (
        (r"layers/attn/.*/kernel", QuantSpec("twn", 2, "tensor")),
        (r"layers/mlp/.*/kernel", QuantSpec("pact", 2, "channel")),
        (r".*", None),
    )
    params = rules.add_learned_scales(loaded.params, rule_set, init_scale=0.9)
    # k at 3x the scale of q and v: one statistic over the joined kernel would quantize it
    # differently from k's own (checked below), so the comparison can tell the two apart.
    attn = params["layers"]["attn"]
    attn["k"] = {**attn["k"], "kernel": 3.0 * attn["k"]["kernel"]}
    quantizer = rules.make_quantizer(rule_set)
    tokens, mask = _tokens_and_mask()

    def loss(params):
        logits = decoder.forward(params, tokens, loaded.spec, mask_BxT=mask, quantizer=quantizer)
        return jnp.mean(jnp.square(logits))

    def value_and_grad(min_rows):
        monkeypatch.setattr(decoder, "FUSE_MIN_ROWS", min_rows)
        return jax.value_and_grad(loss)(params)  # traced anew: the setting is read at trace time

    joined, separate = value_and_grad(1), value_and_grad(10**9)
    np.testing.assert_allclose(joined[0], separate[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(joined[1]), jax.tree.leaves(separate[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    twn = QuantSpec("twn", 2, "tensor")
    q, k = attn["q"]["kernel"][0], attn["k"]["kernel"][0]
    own = quantizers.fake_quantize(k, twn)
    shared = quantizers.fake_quantize(jnp.concatenate([q, k], axis=-1), twn)[:, q.shape[-1] :]
    assert np.abs(np.asarray(own) - np.asarray(shared)).max() > 1e-3

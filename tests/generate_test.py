"""KV-cache generation against step-by-step full recomputation, for every family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from tsld_jax import generate
from tsld_jax.models import attention, decoder, spec_from_hf_config

NEW_TOKENS = 7
PROMPT_LENGTHS = (5, 9, 3)


@functools.cache
def _model(name):
    """A spec from the tiny transformers config, with large random weights (no near-ties)."""
    spec = spec_from_hf_config(tiny_models.CONFIGS[name]().to_dict())
    params = decoder.init_params(jax.random.key(1), spec)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return spec, jax.tree.unflatten(treedef, noisy)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, tiny_models.VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def _pad(prompts, side, length=None):
    length = length or max(map(len, prompts))
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, ids in enumerate(prompts):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        tokens[row, where], mask[row, where] = ids, 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames="spec")
def _full_logits(params, tokens_1xT, mask_1xT, spec):
    return decoder.forward(params, tokens_1xT, spec, mask_BxT=mask_1xT)


def _greedy_by_recomputation(params, spec, ids, steps):
    """Greedy decoding that reruns the whole sequence (no cache) for every new token; the row is
    right-padded to one fixed length so that it compiles once."""
    ids = list(ids)
    length = max(PROMPT_LENGTHS) + NEW_TOKENS
    for _ in range(steps):
        tokens, mask = _pad([ids], "right", length)
        logits = _full_logits(params, tokens, mask, spec)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[-steps:]


@pytest.mark.parametrize(
    "name, tile",
    [(name, attention.QUERY_TILE) for name in sorted(tiny_models.CONFIGS)]
    # Query tiles of 4 over the 11-token prompts: the prefill's tiles cut keys at their end.
    + [("llama_gqa_untied", 4), ("gpt_neo_local", 4)],
)
def test_kv_cache_generation_equals_full_recomputation(name, tile, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_TILE", tile)
    spec, params = _model(name)
    prompts = _prompts()
    # One batch, three paddings: left (row 0), right (row 1), both sides (row 2).
    left, left_mask = _pad(prompts, "left", length=11)
    right, right_mask = _pad(prompts, "right", length=11)
    tokens = np.stack([left[0], right[1], np.roll(right[2], 4)])
    mask = np.stack([left_mask[0], right_mask[1], np.roll(right_mask[2], 4)])
    out = generate.generate_tokens(
        params, spec, tokens, mask, max_new_tokens=NEW_TOKENS, chunk_size=3
    )
    assert out.shape == (len(prompts), NEW_TOKENS)
    for row, ids in enumerate(prompts):
        expected = _greedy_by_recomputation(params, spec, ids, NEW_TOKENS)
        assert out[row].tolist() == expected, (name, row)


@pytest.mark.parametrize("tile", [attention.QUERY_TILE, 4])
def test_chunked_prefill_matches_forward(tile, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_TILE", tile)  # 4: query tiles over the cache's slots
    spec, params = _model("llama_gqa_untied")
    tokens, mask = _pad(_prompts(), "left")

    @jax.jit
    def two_chunks(params, tokens, mask):
        cache = decoder.init_cache(spec, tokens.shape[0], 16)
        first, cache = decoder.hidden_states(
            params, tokens[:, :6], spec, mask_BxT=mask[:, :6], cache=cache
        )
        second, cache = decoder.hidden_states(
            params, tokens[:, 6:], spec, mask_BxT=mask[:, 6:], cache=cache
        )
        return decoder.unembed(params, jnp.concatenate([first, second], axis=1), spec), cache

    chunked, cache = two_chunks(params, tokens, mask)
    full = _full_logits(params, tokens, mask, spec)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(full)[real], atol=1e-4)
    assert int(cache["index"]) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache["next_position"]), PROMPT_LENGTHS)


def test_eos_ends_a_row_and_pads_the_rest():
    spec, params = _model("gpt2")
    prompts = _prompts()
    tokens, mask = _pad(prompts, "left")
    greedy = generate.generate_tokens(params, spec, tokens, mask, max_new_tokens=NEW_TOKENS)
    eos = int(greedy[0, 2])
    out = generate.generate_tokens(
        params, spec, tokens, mask, max_new_tokens=NEW_TOKENS, eos_ids=(eos,), pad_id=-1
    )
    for row in range(len(prompts)):
        hits = np.flatnonzero(greedy[row] == eos)
        end = hits[0] + 1 if len(hits) else NEW_TOKENS
        assert out[row, :end].tolist() == greedy[row, :end].tolist()
        assert (out[row, end:] == -1).all()


class _WordTokenizer:
    """Token i is the word "w{i}"; id 1 is EOS."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(word[1:]) for word in text.split()]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [
            "".join(f" w{t}" for t in row if not (skip_special_tokens and t == 1)) for row in rows
        ]


def test_generate_text_stops_and_cuts_like_the_harness():
    spec, params = _model("opt_pre")
    tokenizer = _WordTokenizer()
    prompts = _prompts()
    texts = [" ".join(f"w{t}" for t in ids) for ids in prompts]
    expected = [_greedy_by_recomputation(params, spec, ids, NEW_TOKENS) for ids in prompts]
    stop = f" w{expected[1][3]}"
    out = generate.generate_text(
        params,
        spec,
        tokenizer,
        texts,
        max_new_tokens=NEW_TOKENS,
        stop_sequences=[stop],
        batch_size=2,
        chunk_size=2,
    )
    for text, ids in zip(out, expected, strict=True):
        ids = ids[: ids.index(1)] if 1 in ids else ids
        assert text == "".join(f" w{t}" for t in ids).split(stop)[0]
    assert stop not in out[1] and len(out[1].split()) == 3


def test_sampling_options():
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
    keys = jax.random.split(jax.random.key(0), 64)

    def draw(sampling):
        return np.asarray(jax.vmap(lambda key: generate._sample(logits, key, sampling))(keys))

    # top_p=0.5 keeps only the most likely token of each row here.
    assert (draw(generate.Sampling(temperature=1.0, top_p=0.5)) == [0, 2]).all()
    free = draw(generate.Sampling(temperature=1.0))
    assert len(np.unique(free[:, 0])) == 3 and (free[:, 0] == 0).mean() > 0.4
    with pytest.raises(ValueError, match="top_p"):
        generate.Sampling(top_p=0.0)


def test_bucket_length():
    assert [generate.bucket_length(n) for n in (1, 16, 17, 100, 700, 900)] == [
        16,
        16,
        32,
        112,
        768,
        1024,
    ]

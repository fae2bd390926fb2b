"""tsld_jax.models.attention: every implementation against a numpy formula and the tiled path.

Forward against numpy, gradients against the tiled path's (jax autodiff of plain jnp), on tiny
shapes with causality, grouped-query heads, sliding windows, padding (left and right) and
soft-capping. The Pallas TPU splash kernel runs in interpret mode; cuDNN needs a GPU, so its
argument mapping (padding compaction, odd lengths, windows) runs through jax's XLA attention
here, and the kernel itself is compiled for sm_80 and sm_90 without a GPU (and for TPU v5e when
libtpu is importable: see ../shared/TPU.md; it is not installed by the Makefile).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsld_jax import aot
from tsld_jax.models import attention, decoder, named
from tsld_jax.models.spec import ModelSpec

B, T, H, N, K = 2, 37, 4, 2, 16  # odd T: the student reads block_size - 1 tokens
SCALE = 0.3


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K)).astype(np.float32)
    k = rng.normal(size=(B, T, N, K)).astype(np.float32)
    v = rng.normal(size=(B, T, N, K)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


PADDINGS = {
    "none": None,
    # row 0 left-padded by 5, row 1 right-padded by 8
    "left_right": np.stack(
        [np.r_[np.zeros(5), np.ones(T - 5)], np.r_[np.ones(T - 8), np.zeros(8)]]
    ),
}


def _numpy_attention(q, k, v, key_mask, window, scale, cap, segments=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthk,bshk->bhts", q, k) * scale
    if cap:
        scores = cap * np.tanh(scores / cap)
    t, s = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    allowed = (s <= t) & ((window == 0) | (t - s < window))
    allowed = np.broadcast_to(allowed, scores.shape)
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, :] > 0)
    if segments is not None:  # a query sees keys of its own segment only
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    scores = np.where(allowed, scores, -1e30)  # a fully masked (padded) row: any finite output
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", probs, v)


def _run(implementation, q, k, v, mask, cap=0.0):
    if implementation == "cudnn_mapping":  # cuDNN's arguments, through XLA's attention
        xla = lambda *a: attention.self_attention(*a, scale=SCALE, cap=cap, implementation="xla")
        return attention._cudnn(q, k, v, mask, scale=SCALE, cap=cap, fallback=xla, backend="xla")
    return attention.self_attention(
        q, k, v, mask, scale=SCALE, cap=cap, implementation=implementation
    )


IMPLEMENTATIONS = ("xla", "auto", "pallas_interpret", "cudnn_mapping")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("window", [0, 5])
def test_forward_and_gradients_match(implementation, padding, window):
    q, k, v = _inputs()
    key_mask = PADDINGS[padding]
    mask_BxT = None if key_mask is None else jnp.asarray(key_mask, jnp.int32)
    # Two windows in the model (a global and a local layer), the traced one selecting.
    mask = attention.Mask(mask_BxT, jnp.int32(window), (0, 5))
    real = np.ones((B, T)) if key_mask is None else key_mask
    real_BxTx1x1 = jnp.asarray(real[:, :, None, None], jnp.float32)

    out = jax.jit(lambda q, k, v: _run(implementation, q, k, v, mask))(q, k, v)
    expected = _numpy_attention(q, k, v, key_mask, window, SCALE, 0.0)
    np.testing.assert_allclose(
        np.asarray(out) * real[:, :, None, None], expected * real[:, :, None, None], atol=2e-5
    )

    # Gradients through real positions only (padded queries' outputs differ by design).
    weights = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(_run(implementation, q, k, v, mask) * weights * real_BxTx1x1)

    grads = jax.jit(jax.grad(loss(implementation), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5)


# Documents packed into each row: row 0 three documents (10, 15, 12 tokens), row 1 two (20, 17).
SEGMENTS = np.stack([np.repeat([0, 1, 2], [10, 15, 12]), np.repeat([0, 1], [20, 17])])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("window", [0, 5])
def test_segments_match_numpy(implementation, padding, window):
    """With segment ids (data.document_attention) no query sees a key of another document:
    every implementation against numpy (cuDNN's mapping falls back to the tiled path), and
    gradients against the tiled path's."""
    q, k, v = _inputs(seed=4)
    key_mask = PADDINGS[padding]
    mask_BxT = None if key_mask is None else jnp.asarray(key_mask, jnp.int32)
    mask = attention.Mask(mask_BxT, jnp.int32(window), (0, 5), jnp.asarray(SEGMENTS, jnp.int32))
    real = np.ones((B, T)) if key_mask is None else key_mask
    real_BxTx1x1 = real[:, :, None, None]

    out = jax.jit(lambda q, k, v: _run(implementation, q, k, v, mask))(q, k, v)
    expected = _numpy_attention(q, k, v, key_mask, window, SCALE, 0.0, SEGMENTS)
    np.testing.assert_allclose(np.asarray(out) * real_BxTx1x1, expected * real_BxTx1x1, atol=2e-5)
    # The reference is not the unsegmented attention (the segments change the outputs).
    unsegmented = _numpy_attention(q, k, v, key_mask, window, SCALE, 0.0)
    assert np.abs((expected - unsegmented) * real_BxTx1x1).max() > 0.1

    weights = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(
            _run(implementation, q, k, v, mask) * weights * jnp.asarray(real_BxTx1x1, jnp.float32)
        )

    grads = jax.jit(jax.grad(loss(implementation), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5)


@pytest.mark.parametrize("implementation", ["pallas_interpret", "cudnn_mapping"])
def test_softcap(implementation):
    """Splash applies Gemma 2's soft-cap in the kernel; cuDNN cannot, and falls back."""
    q, k, v = _inputs(seed=2)
    mask = attention.Mask(None, 0, (0,))
    out = _run(implementation, q * 4, k, v, mask, cap=2.0)
    expected = _numpy_attention(q * 4, k, v, None, 0, SCALE, 2.0)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on an NVIDIA GPU")
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("window", [0, 5])
def test_cudnn_on_gpu(padding, window):
    """cuDNN itself (bench/gpu_check.sh runs this file on the GPU): bf16 inputs, forward
    against numpy and gradients against the tiled path, at bf16's tolerance."""
    q, k, v = _inputs(seed=3, dtype=jnp.bfloat16)
    key_mask = PADDINGS[padding]
    mask_BxT = None if key_mask is None else jnp.asarray(key_mask, jnp.int32)
    mask = attention.Mask(mask_BxT, jnp.int32(window), (0, 5))
    real = (np.ones((B, T)) if key_mask is None else key_mask)[:, :, None, None]
    out = jax.jit(lambda q, k, v: _run("cudnn", q, k, v, mask))(q, k, v)
    expected = _numpy_attention(q, k, v, key_mask, window, SCALE, 0.0)
    np.testing.assert_allclose(np.asarray(out, np.float32) * real, expected * real, atol=2e-2)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(
            _run(implementation, q, k, v, mask).astype(jnp.float32) * real
        )

    grads = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, reference, strict=True):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=5e-2
        )


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.check_implementation("flash")
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        ModelSpec(
            family="llama",
            vocab_size=8,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            mlp_size=8,
            attention="flash",
        )


def _windowed_spec(attention_impl):
    """A random LLaMA-family model with one local (window 4) and one global layer."""
    import dataclasses

    import ml_collections

    random = ml_collections.ConfigDict(
        {
            "vocab_size": 64,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "mlp_size": 64,
        }
    )
    spec = named.random_spec(random)
    return dataclasses.replace(
        spec, local_window=4, attention_layers=("local", "global"), attention=attention_impl
    )


def test_decoder_forward_and_gradients_match_tiled():
    """The decoder's own call: Pallas (interpret) against the tiled path, logits and parameter
    gradients, with padding and a local + a global layer."""
    xla_spec, splash_spec = _windowed_spec("xla"), _windowed_spec("pallas_interpret")
    params = decoder.init_params(jax.random.key(0), xla_spec, std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (B, 19), 0, 64)
    mask = jnp.asarray(
        np.stack([np.r_[np.zeros(3), np.ones(16)], np.r_[np.ones(15), np.zeros(4)]]), jnp.int32
    )
    real = mask[:, :, None].astype(jnp.float32)

    def loss(params, spec):
        logits = decoder.forward(params, tokens, spec, mask_BxT=mask)
        return jnp.sum(jax.nn.log_softmax(logits) * real), logits

    (_, want_logits), want = jax.value_and_grad(loss, has_aux=True)(params, xla_spec)
    (_, logits), got = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, splash_spec
    )
    np.testing.assert_allclose(np.asarray(logits * real), np.asarray(want_logits * real), atol=1e-4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # Gradients reach ~100 here; splash sums in another order (online softmax).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)


def _learned_spec(attention_impl):
    """The windowed model with a learned position table instead of rotary embeddings (GPT-2
    and OPT's scheme), where restarted positions change the inputs themselves."""
    import dataclasses

    spec = _windowed_spec(attention_impl)
    return dataclasses.replace(spec, positional="learned", max_positions=64)


@pytest.mark.parametrize(
    "make_spec, implementation, pipelined",
    [
        (_windowed_spec, "xla", False),
        (_windowed_spec, "pallas_interpret", False),
        (_windowed_spec, "xla", True),
        (_learned_spec, "xla", False),
    ],
)
def test_documents_in_one_block_read_as_if_alone(make_spec, implementation, pipelined):
    """The independent check of data.document_attention: the logits of a block holding two
    documents, with their segment ids, are the logits of each document run alone (positions
    restart per document); without segment ids the second document's logits differ."""
    spec = make_spec(implementation)
    params = decoder.init_params(jax.random.key(0), spec, std=0.2)
    first, second = 7, 12
    tokens = jax.random.randint(jax.random.key(2), (2, first + second), 0, 64)
    segments = jnp.asarray(np.repeat([[0, 1]], 2, axis=0).repeat([first, second], axis=1))
    pipeline = decoder.Pipeline(1, 2, None) if pipelined else None
    packed = decoder.forward(params, tokens, spec, segment_ids_BxT=segments, pipeline=pipeline)
    alone = [
        decoder.forward(params, tokens[:, :first], spec),
        decoder.forward(params, tokens[:, first:], spec),
    ]
    np.testing.assert_allclose(np.asarray(packed[:, :first]), np.asarray(alone[0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(packed[:, first:]), np.asarray(alone[1]), atol=1e-4)
    crossing = decoder.forward(params, tokens, spec)
    assert np.abs(np.asarray(crossing[:, first:] - alone[1])).max() > 1e-2


def test_positions_restart_per_segment_and_count_real_tokens():
    """Each segment counts its own real tokens from 0."""
    segments = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]])
    got = decoder.default_positions(jnp.zeros((2, 8), jnp.int32), mask, segments)
    np.testing.assert_array_equal(
        np.asarray(got), [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 0, 1, 2, 0, 1, 1]]
    )  # a padded token takes its segment's last real position, as without segments


def test_l2l_probabilities_stay_tiled():
    """Collecting attention probabilities (the l2l loss) takes the tiled path whatever is
    chosen: the same probabilities as with "xla", each row a distribution."""
    spec = _windowed_spec("pallas_interpret")
    params = decoder.init_params(jax.random.key(0), spec, std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (1, 9), 0, 64)
    _, aux = decoder.forward(params, tokens, spec, collect=("attn_probs",))
    _, want = decoder.forward(params, tokens, _windowed_spec("xla"), collect=("attn_probs",))
    assert aux["attn_probs"].shape == (2, 1, 4, 9, 9)
    np.testing.assert_allclose(np.asarray(aux["attn_probs"]).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["attn_probs"]), np.asarray(want["attn_probs"]))


# ------------------------------------------------------------------------ deviceless compiles


def _gpu_mesh_or_skip(target):
    if not attention._cudnn_present():
        pytest.skip("cuDNN attention compiles need nvidia-cudnn-cu12 (make's .installed-test)")
    try:
        return aot.gpu_mesh(target)
    except aot.PluginMissing as error:
        pytest.skip(str(error))


_CUDNN_CALL = "__cudnn$fmha"
# jax 0.10.2 writes deviceless programs to the persistent cache but cannot read them back without
# the device (as in tests/aot_test.py); it then recompiles.
_NO_CACHE_READS = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")


@pytest.mark.slow  # as tests/aot_test.py: XLA:GPU compiles
@_NO_CACHE_READS
@pytest.mark.parametrize("target", ["a100-40gb", "h200"])
def test_cudnn_compiles_for_gpu(target):
    """The decoder's train-shaped forward and backward (bf16, odd length, padding, a local and
    a global layer) compiles with cuDNN's fused attention for sm_80 and sm_90; "auto" picks it
    for bf16 and not for float32."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = _gpu_mesh_or_skip(target)
    whole = NamedSharding(mesh, PartitionSpec())

    def text(implementation, dtype):
        spec = _windowed_spec(implementation)
        params = aot.abstract_params(spec, dtype)
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), params
        )
        tokens = jax.ShapeDtypeStruct((4, 511), jnp.int32, sharding=whole)

        def loss(params, tokens):
            logits = decoder.forward(params, tokens, spec, mask_BxT=(tokens > 0).astype(jnp.int32))
            return jnp.mean(logits.astype(jnp.float32) ** 2)

        return jax.jit(jax.grad(loss)).trace(params, tokens).lower().compile().as_text()

    # (Two compiles of about 30 s each: "cudnn" lowers as "auto" does for bf16, and "xla" is the
    # float32 program's attention.)
    assert _CUDNN_CALL in text("auto", jnp.bfloat16)
    assert _CUDNN_CALL not in text("auto", jnp.float32)


def _tpu_devices_or_skip(topology):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("TPU compiles need libtpu (pip install 'jax[tpu]'; ../shared/TPU.md)")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


@_NO_CACHE_READS
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_splash_compiles_for_tpu(topology):
    """The splash kernel (forward and backward) compiles for one TPU chip, and for four inside
    the shard_map `self_attention` puts it in when a mesh is in context; the decoder's "auto"
    picks it for a TPU inside `attention.for_tpu()` (a TPU host's default)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = _tpu_devices_or_skip(topology)
    for mesh in (Mesh(devices[:1], ("data",)), Mesh(devices, ("data",))):
        rows = NamedSharding(mesh, PartitionSpec("data"))
        q = jax.ShapeDtypeStruct((4, 511, 8, 64), jnp.bfloat16, sharding=rows)
        kv = jax.ShapeDtypeStruct((4, 511, 2, 64), jnp.bfloat16, sharding=rows)
        key_mask = jax.ShapeDtypeStruct((4, 511), jnp.int32, sharding=rows)

        def loss(q, k, v, key_mask):
            mask = attention.Mask(key_mask, 0, (0,))
            out = attention.self_attention(q, k, v, mask, scale=0.125, implementation="pallas")
            return jnp.sum(out.astype(jnp.float32))

        with jax.set_mesh(mesh):
            compiled = (
                jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                .trace(q, kv, kv, key_mask)
                .lower()
                .compile()
            )
        assert "tpu_custom_call" in compiled.as_text()

    spec = _windowed_spec("auto")
    whole = NamedSharding(Mesh(devices[:1], ("data",)), PartitionSpec())
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=whole),
        aot.abstract_params(spec),
    )
    tokens = jax.ShapeDtypeStruct((2, 255), jnp.int32, sharding=whole)
    forward = jax.jit(lambda p, t: decoder.forward(p, t, spec, mask_BxT=jnp.ones_like(t)))
    with attention.for_tpu():
        assert "tpu_custom_call" in forward.trace(params, tokens).lower().compile().as_text()
    # From a CPU host and outside for_tpu(), "auto" keeps the tiled path for the TPU too (what
    # --plan's TPU rows plan), and no CPU forward pays for tracing the kernel.
    forward = jax.jit(lambda p, t: decoder.forward(p, t, spec, mask_BxT=jnp.ones_like(t)))
    assert "tpu_custom_call" not in forward.trace(params, tokens).lower().compile().as_text()


def test_config_choice_reaches_the_spec():
    """config.model.attention sets the models' spec (trainer) and the planned spec (--plan)."""
    from configs import base
    from tsld_jax import plan, recipe

    cfg = base.get_config()
    cfg.model.name_or_path = named.RANDOM
    cfg.model.attention = "pallas_interpret"
    assert recipe.load_named_or_path(named.RANDOM, cfg, 0).spec.attention == "pallas_interpret"
    assert plan.model_spec(cfg).attention == "pallas_interpret"
    del cfg.model.attention  # a run's config.json from before the field: the default
    assert recipe.load_named_or_path(named.RANDOM, cfg, 0).spec.attention == "auto"

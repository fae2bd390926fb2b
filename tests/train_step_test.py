"""The training step's optimizer pieces: gradient accumulation, the LR schedule, bf16 compute."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_models

from tsld_jax import train_step
from tsld_jax.models import decoder
from tsld_jax.quant import rules

SPEC = tiny_models.llama_spec(vocab_size=32, num_layers=1, num_kv_heads=2, mlp_size=32)
TRAIN = ml_collections.ConfigDict(
    {
        "lr": 1e-2,
        "warmup_steps": 2,
        "grad_clip": 1.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
    }
)


def _batch():
    tokens = jax.random.randint(jax.random.key(3), (4, 12), 0, SPEC.vocab_size)
    ones = jnp.ones_like(tokens)
    return {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}


def _one_step(grad_accum, kind="logit", dtype=jnp.float32):
    teacher = decoder.init_params(jax.random.key(0), SPEC, std=0.3)
    loss_cfg = ml_collections.ConfigDict({"kind": kind, "temperature": 10.0, "chunk_size": 0})
    optimizer, _ = train_step.make_optimizer(TRAIN, 10)
    step = jax.jit(
        train_step.make_train_step(
            SPEC, rules.default_rules(), loss_cfg, optimizer, grad_accum, dtype
        )
    )
    state = train_step.init_state(jax.tree.map(lambda x: x * 1.1, teacher), optimizer, 0)
    return step(state, _batch(), teacher)


def test_gradient_accumulation_equals_the_full_batch():
    # Each micro-batch holds the same number of counted tokens, so the mean of micro-batch means
    # equals the full-batch mean and the two steps must agree.
    full_state, full_metrics = _one_step(1)
    accum_state, accum_metrics = _one_step(2)
    np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(full_state.step) == 1


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = train_step.make_schedule(1.0, 4, 12)
    got = np.array([schedule(i) for i in range(13)])
    want = np.concatenate([np.arange(4) / 4, 1.0 - np.arange(9) / 8])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bfloat16_compute_keeps_fp32_latent_weights():
    state, metrics = _one_step(1, kind="tsld", dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_step(remat):
    plain_state, plain_metrics = _one_step(1, kind="tsld")
    teacher = decoder.init_params(jax.random.key(0), SPEC, std=0.3)
    loss_cfg = ml_collections.ConfigDict({"kind": "tsld", "temperature": 10.0, "chunk_size": 0})
    optimizer, _ = train_step.make_optimizer(TRAIN, 10)
    step = jax.jit(
        train_step.make_train_step(SPEC, rules.default_rules(), loss_cfg, optimizer, remat=remat)
    )
    state = train_step.init_state(jax.tree.map(lambda x: x * 1.1, teacher), optimizer, 0)
    remat_state, remat_metrics = step(state, _batch(), teacher)
    np.testing.assert_allclose(remat_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(remat_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(remat_state.params), jax.tree.leaves(plain_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

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
# warmup_steps 0: the first step runs at lr (a warm-up starts at 0 and would leave every param
# where it was, so that comparing two steps' params could not fail). eps 1.0, above every
# gradient entry, makes AdamW's first update lr * g / (|g| + 1), close to lr * g, where eps 1e-8
# gives lr * sign(g): comparing two steps' updates then compares their gradients.
TRAIN = ml_collections.ConfigDict(
    {
        "lr": 1e-2,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1.0,
        "weight_decay": 0.0,
    }
)
# bf16 compute against float32 on the same batch and start (test_bfloat16_step_follows_the_
# float32_step): 3x the relative differences that bench/tolerances.py measured
# (docs/tolerances.md), room for another backend's bf16 accumulation order, while a step that
# drops or garbles the gradient (relative difference near 1 or above) fails.
BF16_LOSS_RTOL = 2.5e-3
BF16_GRAD_NORM_RTOL = 6e-2
BF16_UPDATE_RTOL = 0.27


def _batch():
    tokens = jax.random.randint(jax.random.key(3), (4, 12), 0, SPEC.vocab_size)
    ones = jnp.ones_like(tokens)
    return {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}


def _one_step(grad_accum, kind="logit", dtype=jnp.float32, remat=False):
    """One step from the teacher x 1.1; returns (the update as one vector, state, metrics)."""
    teacher = decoder.init_params(jax.random.key(0), SPEC, std=0.3)
    loss_cfg = ml_collections.ConfigDict({"kind": kind, "temperature": 10.0, "chunk_size": 0})
    optimizer, schedule = train_step.make_optimizer(TRAIN, 10)
    assert float(schedule(0)) == pytest.approx(TRAIN.lr)
    step = jax.jit(
        train_step.make_train_step(
            SPEC, rules.default_rules(), loss_cfg, optimizer, grad_accum, dtype, remat
        )
    )
    start = jax.tree.map(lambda x: x * 1.1, teacher)
    state, metrics = step(train_step.init_state(start, optimizer, 0), _batch(), teacher)
    update = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), state.params, start)
    update = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(update)])
    assert np.abs(update).max() > 1e-4 * TRAIN.lr, "the step left the params where they were"
    return update, state, metrics


def _assert_same_update(got, want, rtol):
    # The update is read as new - old params (of size ~0.3): 1e-7 is a few float32 ulps there.
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max() + 1e-7)


def test_gradient_accumulation_equals_the_full_batch():
    # Each micro-batch holds the same number of counted tokens, so the mean of micro-batch means
    # equals the full-batch mean and the two steps must agree.
    full_update, full_state, full_metrics = _one_step(1)
    accum_update, _, accum_metrics = _one_step(2)
    np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    _assert_same_update(accum_update, full_update, rtol=1e-5)
    assert int(full_state.step) == 1


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = train_step.make_schedule(1.0, 4, 12)
    got = np.array([schedule(i) for i in range(13)])
    want = np.concatenate([np.arange(4) / 4, 1.0 - np.arange(9) / 8])
    np.testing.assert_allclose(got, want, atol=1e-6)


def bf16_step_differences():
    """Relative differences of the bf16-compute TSLD step from the float32 one, same batch and
    start: (loss, grad_norm, update as a vector, in L2 norm)."""
    update16, state16, metrics16 = _one_step(1, kind="tsld", dtype=jnp.bfloat16)
    update32, _, metrics32 = _one_step(1, kind="tsld")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state16.params))
    relative = lambda a, b: abs(float(a) - float(b)) / abs(float(b))
    return (
        relative(metrics16["loss"], metrics32["loss"]),
        relative(metrics16["grad_norm"], metrics32["grad_norm"]),
        float(np.linalg.norm(update16 - update32) / np.linalg.norm(update32)),
    )


def test_bfloat16_step_follows_the_float32_step():
    loss, grad_norm, update = bf16_step_differences()
    assert 0 < loss <= BF16_LOSS_RTOL
    assert grad_norm <= BF16_GRAD_NORM_RTOL
    assert 0 < update <= BF16_UPDATE_RTOL


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_step(remat):
    plain_update, _, plain_metrics = _one_step(1, kind="tsld")
    remat_update, _, remat_metrics = _one_step(1, kind="tsld", remat=remat)
    np.testing.assert_allclose(remat_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(remat_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
    _assert_same_update(remat_update, plain_update, rtol=1e-5)

"""The pure training step: student forward with fake-quantized weights, teacher forward under
stop_gradient, the distillation loss, AdamW. Jitted once by the trainer with shardings and a
donated state; the teacher is an argument, never part of the state, never differentiated.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tsld_jax import qat
from tsld_jax.models.spec import ModelSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)


def make_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then linear decay to 0 at `total_steps` (HF Trainer's default)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(train_cfg, total_steps: int):
    """AdamW with global-norm clipping; returns (optimizer, schedule)."""
    schedule = make_schedule(train_cfg.lr, train_cfg.warmup_steps, total_steps)
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        )
    )
    return optax.chain(*parts), schedule


def init_state(params, optimizer, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def make_loss_fn(
    spec: ModelSpec, rules, loss_cfg, compute_dtype=jnp.float32, remat=False, pipeline=None
):
    """loss_fn(params, teacher_params, batch) -> (loss, parts) for one (micro-)batch.

    The objective itself is `qat.qat_loss`; this binds the config and the compute dtype (bf16
    casts the latent fp32 weights for the forward passes only) and the optional
    `decoder.Pipeline` both forward passes run as.
    """

    def cast(tree):
        if tree is None or compute_dtype == jnp.float32:
            return tree
        return jax.tree.map(lambda x: x.astype(compute_dtype), tree)

    def loss_fn(params, teacher_params, batch):
        return qat.qat_loss(
            cast(params),
            cast(teacher_params),
            batch,
            spec,
            rules,
            loss_cfg.kind,
            temperature=loss_cfg.temperature,
            chunk_size=loss_cfg.chunk_size or None,
            remat=remat,
            pipeline=pipeline,
        )

    return loss_fn


def make_train_step(
    spec,
    rules,
    loss_cfg,
    optimizer,
    grad_accum: int = 1,
    compute_dtype=jnp.float32,
    remat=False,
    pipeline=None,
):
    """step(state, batch, teacher_params) -> (state, metrics); pure, to be jitted by the caller.

    `pipeline` (a `decoder.Pipeline`) splits each accumulation micro-batch further into the
    pipeline's microbatches; the two compose (batch = grad_accum x microbatches x rows).
    """
    loss_fn = make_loss_fn(spec, rules, loss_cfg, compute_dtype, remat, pipeline)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, teacher_params):
        if grad_accum == 1:
            (loss, parts), grads = grad_fn(state.params, teacher_params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(total_grads, micro_batch):
                (loss, parts), grads = grad_fn(state.params, teacher_params, micro_batch)
                return jax.tree.map(jnp.add, total_grads, grads), (loss, parts)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (loss, parts) = jax.lax.scan(accumulate, zeros, micro)
            loss, parts = loss.mean(), jax.tree.map(jnp.mean, parts)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {**parts, "loss": loss, "grad_norm": optax.global_norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step

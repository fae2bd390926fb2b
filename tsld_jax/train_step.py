"""The pure training step: student forward with fake-quantized weights, teacher forward under
stop_gradient, the distillation loss, AdamW. Jitted in one place, `jit_train_step`, with
shardings, a donated state and the pipeline the mesh asks for; the trainer, `--plan` and the
deviceless compiles all call it. The teacher is an argument, never part of the state, never
differentiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

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
            # The mean of the micro-batches' gradients, as HF Trainer (and so the authors'
            # trainer) accumulates. For the losses that are means over tokens this is the whole
            # batch's gradient (up to unequal padding); TSLD sums over sequences (PAPER.md), so
            # its accumulated gradient is the whole batch's divided by grad_accum. AdamW's update
            # does not see that scale (but for its eps); gradient clipping thresholds do.
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {**parts, "loss": loss, "grad_norm": optax.global_norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


# config.train.dtype (the compute dtype) and config.model.teacher_dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask")
# With config.data.document_attention, the batch also holds each token's document.
SEGMENT_KEY = "segment_ids"


def batch_keys(data_cfg) -> tuple[str, ...]:
    """The arrays of a training batch under `config.data`."""
    return BATCH_KEYS + ((SEGMENT_KEY,) if data_cfg.get("document_attention", False) else ())


@dataclasses.dataclass(frozen=True)
class JittedStep:
    """The train step as the trainer runs it, and the shardings of its arguments.

    Attributes:
      fn: `fn(state, batch, teacher_params) -> (state, metrics)`, jitted with these shardings
        and the state donated.
      optimizer: the optax transformation the step applies.
      state_shardings: a TrainState of NamedShardings.
      batch_sharding: of every batch array (rows over data x fsdp).
      teacher_shardings: of the teacher's parameters, or None for a run without a teacher.
      teacher_dtype: the dtype the teacher's parameters are passed in.
    """

    fn: Callable
    optimizer: optax.GradientTransformation
    state_shardings: Any
    batch_sharding: NamedSharding
    teacher_shardings: Any
    teacher_dtype: Any

    def init_state(self, params, seed: int) -> TrainState:
        """A fresh state from `params`, created in place on the state's shardings."""
        return jax.jit(
            lambda p: init_state(p, self.optimizer, seed), out_shardings=self.state_shardings
        )(params)

    def abstract_args(
        self, abstract_state, batch_shape: tuple[int, int], teacher_params=None, keys=BATCH_KEYS
    ):
        """`fn`'s arguments as ShapeDtypeStructs carrying their shardings (what a plan or a
        deviceless compile lowers): the state, an int32 batch of `batch_shape` (rows, tokens)
        holding `keys` (`batch_keys`), and the teacher's parameters in `teacher_dtype` (None
        without a teacher)."""

        def placed(tree, shardings, dtype=None):
            return jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s),
                tree,
                shardings,
            )

        state = placed(abstract_state, self.state_shardings)
        batch = {
            key: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=self.batch_sharding)
            for key in keys
        }
        teacher = None
        if self.teacher_shardings is not None:
            teacher = placed(teacher_params, self.teacher_shardings, self.teacher_dtype)
        return state, batch, teacher


def jit_train_step(
    spec: ModelSpec,
    rules,
    loss_cfg,
    train_cfg,
    optimizer: optax.GradientTransformation,
    abstract_state,
    mesh: Mesh,
    teacher_params=None,
    teacher_dtype: str = "float32",
) -> JittedStep:
    """The one place the train step is jitted: the trainer, `--plan` (`plan.step_program`) and
    the deviceless compiles (`aot.train_step_program`) all build it here, so a plan is of the
    program that runs.

    Args:
      spec: the student's architecture (the teacher's forward reads its own shapes).
      rules: quantization rules, or None for full precision.
      loss_cfg: config.loss (kind, temperature, chunk_size).
      train_cfg: config.train; reads grad_accum, dtype ("float32"/"bfloat16" compute), remat
        and microbatches (the pipeline's, with the mesh's "stage" axis as its stages).
      optimizer: from `make_optimizer`.
      abstract_state: the TrainState's shapes (`jax.eval_shape` of `init_state`).
      mesh: from `sharding.make_mesh`; a "stage" axis over 1 runs the layers as a pipeline.
      teacher_params: the teacher's parameters (arrays or ShapeDtypeStructs; only their shapes
        are read), or None for a run without a teacher (the fp stage).
      teacher_dtype: config.model.teacher_dtype, the dtype the teacher is passed in.

    Returns:
      The jitted step and its argument shardings.
    """
    from tsld_jax import sharding  # sharding.py stays free of the train step's imports
    from tsld_jax.models import pipeline as pipeline_lib

    stages = mesh.shape.get(pipeline_lib.STAGE_AXIS, 1)
    pipeline = None
    if stages > 1 or train_cfg.microbatches > 1:
        pipeline = pipeline_lib.Pipeline(stages, train_cfg.microbatches, mesh)
    state_shardings = sharding.state_shardings(abstract_state, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    # The teacher is sharded like the student (each device holds its shard, never all of it).
    teacher_shardings = None
    if teacher_params is not None:
        teacher_shardings = sharding.param_shardings(teacher_params, mesh)
    step = make_train_step(
        spec,
        rules,
        loss_cfg,
        optimizer,
        train_cfg.grad_accum,
        DTYPES[train_cfg.dtype],
        train_cfg.remat,
        pipeline,
    )
    fn = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, teacher_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    return JittedStep(
        fn, optimizer, state_shardings, batch_sharding, teacher_shardings, DTYPES[teacher_dtype]
    )

"""Pipeline parallelism over the stacked layers: S stages, M microbatches, GPipe's schedule.

The L stacked layers are split into S contiguous stages of L / S layers (the "layers" axis of
every block parameter is sharded over the mesh's "stage" axis, so this reshape moves nothing),
and the batch into M microbatches. A buffer holds one microbatch's hidden states per stage,
(S, B / M, T, D), sharded over "stage". Each of the M + S - 1 iterations runs every stage on its
slot at once (`vmap` over the stage axis: with the parameters and the buffer sharded over
"stage", each stage's devices compute their own stage), feeds the next microbatch into stage 0,
collects stage S - 1's output, and shifts the buffer one stage on with an explicit `ppermute`
in a `shard_map` over the mesh. This is the pattern of JAX's shard_map notes and of MaxText's
pipeline; written here so that the stage body is our own scanned decoder block, unchanged.

Inside a stage everything stays under the compiler's sharding propagation (GSPMD), so data,
fsdp and tensor parallelism compose with the stage axis with no change to the block code.
Slots that hold no microbatch yet (the pipeline's fill and drain, the "bubble") compute on
zeros; their outputs never reach the loss, so they contribute exact zeros to the gradients.
The bubble costs (S - 1) / (M + S - 1) of the stage compute: take M >= 2S or more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

try:  # jax >= 0.7 (and 0.10-0.12, which this project supports)
    _shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map

STAGE_AXIS = "stage"
# The axes a microbatch's rows are split over (sharding.BATCH_AXES; repeated here so the model
# code does not import the trainer's sharding module).
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How `decoder.forward` runs its layer scan as a pipeline.

    Attributes:
      stages: S, the number of pipeline stages; num_layers must divide by it.
      microbatches: M, microbatches per forward pass; the batch must divide by it.
      mesh: the mesh whose "stage" axis (of size `stages`) holds the stages; None runs the same
        schedule on whatever devices the arrays are on (for tests: the single-device reference
        of the schedule itself).
    """

    stages: int
    microbatches: int
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.stages < 1 or self.microbatches < 1:
            raise ValueError(f"stages and microbatches must be >= 1, got {self}")
        if self.mesh is not None and self.mesh.shape.get(STAGE_AXIS, 1) != self.stages:
            raise ValueError(
                f"pipeline of {self.stages} stages on a mesh whose stage axis is "
                f"{self.mesh.shape.get(STAGE_AXIS, 1)}"
            )


# layer_fn(layer_params, h_BxTxD, positions_BxT, mask, consts) -> h_BxTxD, where mask is the
# microbatch's slice of `run`'s mask_BxT pytree and consts the layer's slice of `run`'s consts_L.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]


def _to_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    # Microbatch m takes rows m, m + M, m + 2M, ...: the rows each data-parallel device holds
    # stay on it (a contiguous split would move rows across devices).
    return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)


def _from_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(axis for axis in BATCH_AXES if axis in mesh.shape)


def _shift(buffer_SxBxTxD: jax.Array, pipeline: Pipeline) -> jax.Array:
    """Stage s's output becomes stage s + 1's input (the last wraps to stage 0, overwritten)."""
    stages = pipeline.stages
    if pipeline.mesh is None:
        return jnp.roll(buffer_SxBxTxD, 1, axis=0)
    spec = PartitionSpec(STAGE_AXIS, _batch_axes(pipeline.mesh))
    permutation = [(s, (s + 1) % stages) for s in range(stages)]
    shift = _shard_map(
        lambda x: lax.ppermute(x, STAGE_AXIS, permutation),
        mesh=pipeline.mesh,
        in_specs=spec,
        out_specs=spec,
    )
    return shift(buffer_SxBxTxD)


def _constrain(x: jax.Array, pipeline: Pipeline) -> jax.Array:
    if pipeline.mesh is None:
        return x
    spec = PartitionSpec(STAGE_AXIS, _batch_axes(pipeline.mesh))
    return lax.with_sharding_constraint(x, NamedSharding(pipeline.mesh, spec))


def run(
    layer_fn: LayerFn,
    layers: Any,
    consts_L: Any,
    h_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    mask_BxT: jax.Array | None,
    pipeline: Pipeline,
) -> jax.Array:
    """The stacked layers applied to h as an S-stage, M-microbatch pipeline.

    Args:
      layer_fn: one block (already under the forward's remat policy).
      layers: the stacked block parameters, leading axis L.
      consts_L: what differs between layers besides their parameters (a pytree of arrays with
        leading axis L: the attention window, the rotary frequencies), given to each layer.
      h_BxTxD: the embedded input.
      positions_BxT: position ids.
      mask_BxT: 1 for real tokens (None: all real); any pytree of (B, T) arrays (the decoder
        passes the padding mask and the segment ids), split into microbatches like h.
      pipeline: stages and microbatches (and the mesh).

    Returns:
      The last block's output, (B, T, D), rows in their original order.
    """
    stages, micro = pipeline.stages, pipeline.microbatches
    num_layers = jax.tree.leaves(consts_L)[0].shape[0]
    if num_layers % stages:
        raise ValueError(f"{num_layers} layers do not split into {stages} pipeline stages")
    if h_BxTxD.shape[0] % micro:
        raise ValueError(f"a batch of {h_BxTxD.shape[0]} does not split into {micro} microbatches")
    per_stage = num_layers // stages
    stage_layers = jax.tree.map(lambda x: x.reshape(stages, per_stage, *x.shape[1:]), layers)
    consts_SxL = jax.tree.map(lambda x: x.reshape(stages, per_stage, *x.shape[1:]), consts_L)

    h_MxBxTxD = _to_microbatches(h_BxTxD, micro)
    positions_MxBxT = _to_microbatches(positions_BxT, micro)
    mask_MxBxT = jax.tree.map(lambda x: _to_microbatches(x, micro), mask_BxT)

    def stage_fn(params, consts_L, h, positions, mask):
        def body(h, xs):
            layer, consts = xs
            return layer_fn(layer, h, positions, mask, consts), None

        return lax.scan(body, h, (params, consts_L))[0]

    run_stages = jax.vmap(stage_fn)
    stage_ids = jnp.arange(stages)

    def iteration(buffer, i):
        # Stage s works on microbatch i - s (when 0 <= i - s < M; otherwise on padding).
        which_S = jnp.clip(i - stage_ids, 0, micro - 1)
        fresh = lax.dynamic_index_in_dim(h_MxBxTxD, jnp.minimum(i, micro - 1), keepdims=False)
        first = (stage_ids == 0).reshape(stages, 1, 1, 1)
        buffer = _constrain(jnp.where(first, fresh[None].astype(buffer.dtype), buffer), pipeline)
        positions = positions_MxBxT[which_S]
        mask = jax.tree.map(lambda x: x[which_S], mask_MxBxT)
        out = _constrain(run_stages(stage_layers, consts_SxL, buffer, positions, mask), pipeline)
        return _shift(out, pipeline), out[stages - 1]

    buffer = _constrain(jnp.zeros((stages, *h_MxBxTxD.shape[1:]), h_BxTxD.dtype), pipeline)
    _, last_IxBxTxD = lax.scan(iteration, buffer, jnp.arange(micro + stages - 1))
    return _from_microbatches(last_IxBxTxD[stages - 1 :])

"""Device meshes and parameter/batch shardings.

Two tables decide where a parameter lives: ordered (path regex -> logical axis names) rules give
each parameter's axes meaning ("embed", "heads", "mlp", "vocab", "layers"), and the mesh rules
map logical names to mesh axes ("stage", "data", "fsdp", "tensor"). The path matcher is the one that
decides quantization (`quant.rules.match_rules`). An axis whose size the mesh axis does not
divide is replicated instead (tiny models on many devices stay correct, just less sharded).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsld_jax.quant import rules as rules_lib

# "stage" first: pipeline stages exchange only one microbatch's activations per step, so they
# take the slowest links (across hosts); tensor parallelism, which talks every layer, the fastest.
MESH_AXES = ("stage", "data", "fsdp", "tensor")

# Logical axes of every parameter of the decoder (first match wins; catch-all: replicated).
LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...] | None], ...] = (
    (r"embed/tokens", ("vocab", "embed")),
    (r"positions", (None, "embed")),
    (r"layers/attn/(q|k|v)/kernel", ("layers", "embed", "heads")),
    (r"layers/attn/(q|k|v)/(bias|quant_scale)", ("layers", "heads")),
    (r"layers/attn/o/kernel", ("layers", "heads", "embed")),
    (r"layers/mlp/(up|gate)/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/(up|gate)/(bias|quant_scale)", ("layers", "mlp")),
    (r"layers/mlp/down/kernel", ("layers", "mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    # Every per-layer norm (attn_norm, mlp_norm, Gemma's post norms, q/k norms): split over the
    # pipeline stages with its layer, its width replicated (it is tiny).
    (r"layers/(.*/)?[a-z_]*norm/(scale|bias)", ("layers", None)),
    (r".*", None),
)

# Logical axis -> mesh axis. FSDP shards the model width; tensor parallelism shards heads, the
# MLP width and the vocabulary (Megatron-style column/row splits); pipeline stages split the
# stacked layers into contiguous blocks, one per stage (`models.pipeline`).
MESH_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": "stage",
}

# Batches: the batch axis is split over every data-like axis.
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, stage: int = 1) -> Mesh:
    """A (stage, data, fsdp, tensor) mesh; one of data/fsdp/tensor may be -1 to take the devices
    the others leave."""
    devices = jax.devices() if devices is None else devices
    if stage < 1:
        raise ValueError(f"the stage axis must be >= 1, got {stage}")
    if len(devices) % stage:
        raise ValueError(f"{len(devices)} devices do not split into {stage} pipeline stages")
    stage_devices, devices = devices, devices[: len(devices) // stage]
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive (one may be -1), got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into a mesh of {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, {len(devices)} are available"
        )
    return Mesh(np.asarray(stage_devices).reshape([stage, *sizes]), MESH_AXES)


def config_mesh(mesh_cfg, devices=None) -> Mesh:
    """The mesh config.mesh describes (stage, data, fsdp, tensor; one of data/fsdp/tensor may
    be -1) over `devices` (default: all of them): the trainer's mesh and the one `--plan`
    compiles for."""
    return make_mesh(
        mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices, stage=mesh_cfg.stage
    )


def _spec_for(shape: tuple[int, ...], logical, mesh: Mesh, name: str) -> PartitionSpec:
    if logical is None:
        return PartitionSpec()
    axes = []
    for size, logical_name in zip(shape, logical, strict=True):
        mesh_axis = MESH_RULES.get(logical_name) if logical_name else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            logging.debug(
                "%s: %s=%d not divisible by %s; replicated", name, logical_name, size, mesh_axis
            )
            mesh_axis = None
        axes.append(mesh_axis)
    return PartitionSpec(*axes)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings for a parameter pytree (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        name = rules_lib.path_name(path)
        logical = rules_lib.match(name, LOGICAL_AXES)
        if logical is not None and len(logical) != len(leaf.shape):
            logical = None
        return NamedSharding(mesh, _spec_for(tuple(leaf.shape), logical, mesh, name))

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(abstract_state: Any, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Shardings of a TrainState: params by the rules, optimizer moments like their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(abstract_state.params, mesh)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return abstract_state.replace(
        step=replicated, params=params, opt_state=opt_state, rng=replicated
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: leading axis split over data x fsdp, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))

"""A memory plan before anything runs: `train.py --config C --plan TARGET`.

Compiles the trainer's step for TARGET without its hardware (`aot`'s deviceless XLA:GPU or
XLA:TPU compile; "cpu:N" uses N of the CPU's devices, fake ones where XLA_FLAGS makes them) from
abstract weights of the config's model, and reads XLA's per-device memory plan. When the config
does not fit, other meshes, remat modes and teacher dtypes are compiled until one does.

Targets: a GPU and its count ("a100-40gb:8", "h100-80gb:1", "h200:1"); a TPU slice by chips
("v5e:8", "v6e:16"), by topology ("v5p:2x2x1") or by Cloud accelerator type ("v5p-8": 8
TensorCores, 4 chips); "cpu:N".

Fit rule: on a GPU a plan fits when its total is at most the device memory less a reserve of
max(2 GiB, 5%) (CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation, which XLA's
plan does not count): 38 GiB usable on an A100-40GB, 76 GiB on an H100-80GB. On a TPU the limit
is XLA:TPU's own (aot.TpuTarget.usable_memory_size; it refuses to compile a larger program).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from tsld_jax import aot, config_utils, recipe, sharding, train_step
from tsld_jax.models import gguf, named
from tsld_jax.models.errors import LoadError
from tsld_jax.models.spec import ModelSpec, spec_from_hf_config

GIB = 1024**3


class Target(NamedTuple):
    """A --plan target: `kind` a GPU of aot.TARGETS, a TPU of aot.TPU_TARGETS or "cpu";
    `count` devices; `slice` the TPU slice as named ("v5p:2x2x1", "v6e-8"), else ""."""

    kind: str
    count: int
    slice: str = ""


def parse_target(text: str) -> Target:
    """ "a100-40gb:8" -> Target("a100-40gb", 8); "v5p:2x2x1" -> Target("v5p", 4, "v5p:2x2x1");
    raises ConfigError naming the flag."""
    kinds = (*aot.TARGETS, *aot.TPU_TARGETS, "cpu")
    name, _, count = text.partition(":")
    tpu = name if name in aot.TPU_TARGETS else name.partition("-")[0]
    if tpu in aot.TPU_TARGETS and (name == tpu or not count):
        try:
            _, _, devices = aot.parse_tpu_slice(text)
        except ValueError as error:
            raise config_utils.ConfigError(f"--plan: {error}") from None
        return Target(tpu, devices, text)
    if name not in kinds:
        raise config_utils.ConfigError(
            f"--plan: unknown target {name!r} in {text!r}; expected NAME:DEVICES with NAME one "
            f"of {', '.join(kinds)} (a TPU also as NAME:TOPOLOGY, e.g. v5p:2x2x1, or by Cloud "
            "accelerator type, e.g. v5p-8)"
        )
    if not count.isdigit() or int(count) < 1:
        raise config_utils.ConfigError(
            f"--plan: {text!r} needs a device count >= 1 after the colon, e.g. {name}:8"
        )
    return Target(name, int(count))


def capacity(kind: str, count: int) -> int:
    """Bytes of memory per device of a target (the CPU's RAM shared by its fake devices)."""
    if kind == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
    if kind in aot.TPU_TARGETS:
        return aot.TPU_TARGETS[kind].device_memory_size
    return aot.TARGETS[kind].device_memory_size


def usable(total_bytes: int) -> int:
    return total_bytes - max(2 * GIB, total_bytes // 20)


def usable_bytes(kind: str, count: int) -> int:
    """What a plan may total per device: on a TPU the limit XLA:TPU itself enforces (its
    runtime's reserve taken; nothing else shares the HBM), elsewhere `usable(capacity)`."""
    if kind in aot.TPU_TARGETS:
        return aot.TPU_TARGETS[kind].usable_memory_size
    return usable(capacity(kind, count))


def _hf_config(name: str) -> dict | None:
    from configs import paper

    if name in paper.HF_CONFIGS:
        return paper.HF_CONFIGS[name]
    path = os.path.join(name, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def model_spec(cfg, name: str | None = None) -> ModelSpec:
    """The architecture a config names, without its weights: "random" from model.random,
    SmolLM2, a local HF directory's config.json, or a paper hub id (configs/paper.HF_CONFIGS);
    attention as `model.attention` says."""
    return recipe.with_attention(_architecture(cfg, name), cfg)


def _architecture(cfg, name: str | None = None) -> ModelSpec:
    name = name or cfg.model.name_or_path
    if name == named.RANDOM:
        return named.random_spec(cfg.model.random)
    if name == named.SMOLLM2:
        return aot.SMOLLM2_135M
    hf = _hf_config(name)
    if hf is None and (name in named.GGUF_NAMES or name.endswith(".gguf")):
        try:  # the header's metadata only: the weights are memory-mapped, never read
            hf = gguf.hf_config_from_gguf(named.path(name) if name in named.GGUF_NAMES else name)
        except LoadError as error:
            raise config_utils.ConfigError(f"config.model.name_or_path: {error}") from None
    if hf is None:
        raise config_utils.ConfigError(
            f"config.model.name_or_path: --plan cannot read the architecture of {name!r} "
            "offline (not a local HF directory, nor a hub id in configs/paper.HF_CONFIGS)"
        )
    return spec_from_hf_config(hf)


def devices(kind: str, count: int, slice_: str = "") -> list[Any]:
    if kind in aot.TPU_TARGETS:
        return aot.tpu_devices(slice_ or f"{kind}:{count}")
    if kind != "cpu":
        return aot.gpu_devices(kind, count)
    cpus = jax.devices("cpu")
    if len(cpus) < count:
        raise config_utils.ConfigError(
            f"--plan: cpu:{count} needs {count} CPU devices, this process has {len(cpus)} "
            f"(XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts)"
        )
    return cpus[:count]


def _bytes_per_device(tree: Any) -> int:
    return int(
        sum(
            np.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
            for a in jax.tree.leaves(tree)
        )
    )


def step_program(cfg, spec: ModelSpec, mesh, teacher_spec: ModelSpec | None = None):
    """The trainer's jitted step (`train_step.jit_train_step`: the same shardings, donation,
    pipeline and teacher placement) and its abstract arguments, as an `aot.Program`."""
    rules = recipe.quant_rules(cfg)
    params = jax.eval_shape(
        lambda p: recipe.initial_student_params(p, rules, cfg), aot.abstract_params(spec)
    )
    state, optimizer, _ = recipe.abstract_state(cfg, params, 1000)
    teacher = aot.abstract_params(teacher_spec or spec) if cfg.stage != "fp" else None
    step = train_step.jit_train_step(
        spec, rules, cfg.loss, cfg.train, optimizer, state, mesh, teacher, cfg.model.teacher_dtype
    )
    shape = (cfg.data.batch_size, cfg.data.block_size)
    args = step.abstract_args(state, shape, teacher, train_step.batch_keys(cfg.data))
    return aot.Program(step.fn, args, {})


@dataclasses.dataclass
class Plan:
    """One compiled configuration's per-device bytes.

    `mesh` is the (data, fsdp, tensor) split of each pipeline stage; `stages` and
    `microbatches` are config.mesh.stage and config.train.microbatches (the pipeline, when
    either is over 1).
    """

    mesh: dict[str, int]
    remat: str
    teacher_dtype: str
    stages: int = 1
    microbatches: int = 1
    parameters: int = 0
    optimizer_state: int = 0
    teacher: int = 0
    batch_and_other: int = 0
    activations_and_temporaries: int = 0
    total: int = 0
    fits: bool = False
    error: str = ""
    compile_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("parameters", "optimizer_state", "teacher", "batch_and_other",
                    "activations_and_temporaries", "total"):  # fmt: skip
            out[key + "_gib"] = round(out[key] / GIB, 3)
        return out


def _mesh_sizes(cfg, count: int) -> dict[str, int]:
    # The data x fsdp x tensor split of each of the mesh.stage stages' devices.
    per_stage = count // cfg.mesh.stage
    sizes = {axis: cfg.mesh[axis] for axis in ("data", "fsdp", "tensor")}
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    return {a: (per_stage // fixed if s == -1 else s) for a, s in sizes.items()}


def plan_one(cfg, target: Target, spec: ModelSpec, teacher_spec=None) -> Plan:
    """Compiles the config's step for the target and reads its memory plan."""
    kind, count, _ = target
    result = Plan(
        _mesh_sizes(cfg, count),
        cfg.train.remat,
        cfg.model.teacher_dtype,
        cfg.mesh.stage,
        cfg.train.microbatches,
    )
    try:
        config_utils.validate_mesh(cfg, count)
        config_utils.validate_pipeline(cfg, spec.num_layers)
    except config_utils.ConfigError as error:
        result.error = str(error)
        return result
    mesh = sharding.config_mesh(cfg.mesh, devices=devices(*target))
    program = step_program(cfg, spec, mesh, teacher_spec)
    start = time.perf_counter()
    try:
        _, memory = aot.compile_program(program)
        result.compile_seconds = round(time.perf_counter() - start, 1)
    except Exception as error:  # XLA's compile errors carry no stable type across versions
        # XLA:TPU refuses a program larger than the HBM ("Ran out of memory ... exceeds
        # available HBM"): that is this plan's answer, does not fit, and the alternatives run.
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return result
    state, batch, teacher = program.args
    result.parameters = _bytes_per_device(state.params)
    result.optimizer_state = _bytes_per_device(state.opt_state)
    result.teacher = _bytes_per_device(teacher) if teacher is not None else 0
    result.batch_and_other = (
        memory.arguments - result.parameters - result.optimizer_state - result.teacher
    )
    result.activations_and_temporaries = memory.total - memory.arguments
    result.total = memory.total
    result.fits = memory.total <= usable_bytes(kind, count)
    return result


def _alternatives(cfg, count: int, spec: ModelSpec):
    """Config variants to try, fewest changes first: meshes that split the batch, remat
    "full", a bf16 teacher. The pipeline (mesh.stage, train.microbatches) stays as configured;
    the meshes split each stage's devices."""
    rows = cfg.data.batch_size // cfg.train.grad_accum // cfg.train.microbatches
    per_stage = count // cfg.mesh.stage
    meshes = []
    for data, fsdp in itertools.product(range(1, per_stage + 1), repeat=2):
        if per_stage % (data * fsdp) or rows % (data * fsdp):
            continue
        tensor = per_stage // (data * fsdp)
        if spec.num_kv_heads % tensor or spec.mlp_size % tensor:
            continue
        meshes.append({"data": data, "fsdp": fsdp, "tensor": tensor})
    # Most fsdp first (shards everything, communication that overlaps), then least tensor.
    meshes.sort(key=lambda m: (-m["fsdp"], m["tensor"]))
    current = _mesh_sizes(cfg, count)
    meshes = [m for m in meshes if m != current] or []
    mesh_options = [current, *meshes[:2]]
    remats = [cfg.train.remat] + (["full"] if cfg.train.remat != "full" else [])
    teachers = [cfg.model.teacher_dtype]
    if cfg.stage != "fp" and cfg.model.teacher_dtype != "bfloat16":
        teachers.append("bfloat16")
    options = []
    for mesh, remat, teacher in itertools.product(mesh_options, remats, teachers):
        changes = (
            (mesh != current) + (remat != cfg.train.remat) + (teacher != cfg.model.teacher_dtype)
        )
        if changes:
            options.append((changes, mesh, remat, teacher))
    options.sort(key=lambda o: o[0])
    for _, mesh, remat, teacher in options:
        variant = copy.deepcopy(cfg)
        with variant.unlocked():
            for axis, size in mesh.items():
                variant.mesh[axis] = size
            variant.train.remat = remat
            variant.model.teacher_dtype = teacher
        yield variant


def plan(cfg, target: str, max_alternatives: int = 3) -> dict[str, Any]:
    """The plan of a config on a target and, when it does not fit, of up to `max_alternatives`
    variants (stopping at the first that fits)."""
    config_utils.validate(cfg, weights=False)  # the architecture is all a plan reads
    parsed = parse_target(target)
    kind, count, _ = parsed
    spec = model_spec(cfg)
    teacher_spec = None
    if cfg.stage != "fp" and cfg.model.teacher and cfg.model.teacher != cfg.model.name_or_path:
        teacher_spec = model_spec(cfg, cfg.model.teacher)
    result = plan_one(cfg, parsed, spec, teacher_spec)
    out = {
        "target": target,
        "model": cfg.model.name_or_path,
        "batch": [cfg.data.batch_size, cfg.data.block_size],
        "device_memory_gib": round(capacity(kind, count) / GIB, 3),
        "usable_gib": round(usable_bytes(kind, count) / GIB, 3),
        "plan": result.as_dict(),
        "alternatives": [],
    }
    if not result.fits:
        for variant in itertools.islice(_alternatives(cfg, count, spec), max_alternatives):
            alt = plan_one(variant, parsed, spec, teacher_spec)
            out["alternatives"].append(alt.as_dict())
            if alt.fits:
                break
    return out


def _line(p: dict[str, Any]) -> str:
    sizes = ({"stage": p["stages"]} if p["stages"] > 1 else {}) | p["mesh"]
    mesh = " x ".join(f"{k}={v}" for k, v in sizes.items())
    head = f"mesh {mesh}, remat {p['remat']}, teacher {p['teacher_dtype']}"
    if p["microbatches"] > 1:
        head += f", {p['microbatches']} microbatches"
    if p["error"]:
        return f"{head}: cannot compile: {p['error']}"
    return (
        head
        + ": "
        + ", ".join(
            f"{name} {p[key + '_gib']:.2f} GiB"
            for name, key in [
                ("parameters", "parameters"),
                ("optimizer state", "optimizer_state"),
                ("teacher", "teacher"),
                ("batch/other", "batch_and_other"),
                ("activations and temporaries", "activations_and_temporaries"),
                ("total", "total"),
            ]
        )
        + (" -> fits" if p["fits"] else " -> does NOT fit")
    )


def format_plan(out: dict[str, Any]) -> str:
    lines = [
        f"plan for {out['model']} on {out['target']} (batch {out['batch'][0]} x "
        f"{out['batch'][1]}; per device; usable {out['usable_gib']:.1f} of "
        f"{out['device_memory_gib']:.1f} GiB):",
        "  " + _line(out["plan"]),
    ]
    if out["alternatives"]:
        lines.append("alternatives:")
        lines += ["  " + _line(p) for p in out["alternatives"]]
        fitting = [p for p in out["alternatives"] if p["fits"]]
        if fitting:
            p = fitting[0]
            flags = [f"--config.mesh.{k}={v}" for k, v in p["mesh"].items()]
            flags += [f"--config.train.remat={p['remat']}"]
            flags += [f"--config.model.teacher_dtype={p['teacher_dtype']}"]
            lines.append("fits with: " + " ".join(flags))
        else:
            lines.append("none of the alternatives tried fits")
    return "\n".join(lines)

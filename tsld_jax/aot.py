"""Compile programs for NVIDIA GPUs and Cloud TPUs without one (deviceless AOT), and read their
memory plan.

XLA:GPU compiles a jitted program for a GPU that is not attached when it is given the target's
device description: its whole GPU pipeline runs (fusion, the Triton emitters of GEMMs and
Pallas kernels, LLVM, ptxas), minus autotuning. That catches what lowering alone does not
(tiling failures, shared-memory overflows, unsupported ops), and the compiled program's memory
analysis gives per-device bytes as the GPU compiler plans them. No weights are needed: every
input is a `jax.ShapeDtypeStruct` carrying its sharding on a mesh of compile-only devices.

It needs the CUDA plugin beside jax (no GPU, no driver): `pip install --no-deps
jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version> nvidia-cuda-nvcc-cu12
nvidia-nvjitlink-cu12 nvidia-cuda-runtime-cu12`, and `JAX_PLATFORMS=cpu` so the host keeps
running on its CPU (the plugin then only serves compiles; it warns that it cannot load cuDNN),
or `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` (without it, on a machine without a GPU the plugin fails
its cuDNN check and stays unregistered; jax then still falls back to the CPU). `import tsld_jax`
sets the latter where no NVIDIA driver is installed, before the first backend starts.

Typical use:

    from tsld_jax import aot
    mesh = aot.gpu_mesh("h200", num_devices=1)
    program = aot.train_step_program(aot.SMOLLM2_135M, mesh, loss="tsld", remat="dots")
    compiled, memory = aot.compile_program(program)
    print(memory)  # per device: arguments, outputs, temporaries, code, total

TPUs the same way, through libtpu (`pip install 'jax[tpu]==<jax version>'`; ../shared/TPU.md):
`tpu_mesh("v5e:8")` (chips), `tpu_mesh("v5p:2x2x1")` (a topology) or `tpu_mesh("v5p-8")` (Cloud's
accelerator type: 8 TensorCores, 4 chips) in place of `gpu_mesh`. libtpu's warnings about the
TPU VM it is not on are kept off stderr.

`train_step_program` builds the trainer's jitted step (`train_step.jit_train_step`, the one
builder the trainer and `--plan` also call); `forward_program`, `choice_program`,
`prefill_program` and `decode_program` build evaluation's and generation's own jitted functions
for a float, fake-quantized or packed model; `quantized_matmul_program` one Pallas kernel
launch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import os
import sys
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsld_jax.models.spec import ModelSpec, spec_from_hf_config

# SmolLM2-135M's Hugging Face config (the fields the decoder reads), so its real shapes can be
# compiled without the model file.
SMOLLM2_135M_CONFIG = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
SMOLLM2_135M = spec_from_hf_config(SMOLLM2_135M_CONFIG)


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """The device facts XLA:GPU compiles for (a `GpuTargetConfig` text proto, see GPU.md).

    Attributes:
      name: the marketing name, also the proto's device description.
      compute_capability: (major, minor): (8, 0) A100, (9, 0) H100/H200.
      core_count: streaming multiprocessors.
      fpus_per_core: float32 lanes per SM.
      shared_memory_per_core: bytes of shared memory per SM.
      shared_memory_per_block_optin: the most one block may opt in to.
      l2_cache_size: bytes.
      memory_bandwidth: bytes/s.
      device_memory_size: bytes.
      clock_rate_ghz: SM clock.
    """

    name: str
    compute_capability: tuple[int, int]
    core_count: int
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    l2_cache_size: int
    memory_bandwidth: float
    device_memory_size: int
    clock_rate_ghz: float

    def config_text(self) -> str:
        """The `GpuTargetConfig` text proto of this target."""
        major, minor = self.compute_capability
        return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: {self.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_cache_size}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.device_memory_size}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{self.name}"
"""


_H200 = GpuTarget(
    name="NVIDIA H200",
    compute_capability=(9, 0),
    core_count=132,
    fpus_per_core=128,
    shared_memory_per_core=233472,
    shared_memory_per_block_optin=232448,
    l2_cache_size=52428800,
    memory_bandwidth=4.8e12,
    device_memory_size=150_000_000_000,
    clock_rate_ghz=1.98,
)
TARGETS: dict[str, GpuTarget] = {
    "a100-40gb": GpuTarget(
        name="NVIDIA A100-SXM4-40GB",
        compute_capability=(8, 0),
        core_count=108,
        fpus_per_core=64,
        shared_memory_per_core=167936,
        shared_memory_per_block_optin=166912,
        l2_cache_size=41943040,
        memory_bandwidth=1.555e12,
        device_memory_size=42949672960,
        clock_rate_ghz=1.41,
    ),
    "h100-80gb": dataclasses.replace(
        _H200,
        name="NVIDIA H100 80GB HBM3",
        memory_bandwidth=3.35e12,
        device_memory_size=85899345920,
    ),
    "h200": _H200,
}


def _target(target: str | GpuTarget) -> GpuTarget:
    if isinstance(target, GpuTarget):
        return target
    if target not in TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; expected one of {sorted(TARGETS)}")
    return TARGETS[target]


class PluginMissing(RuntimeError):
    """JAX cannot describe a GPU here: the CUDA plugin is not installed (or not usable). The
    message is one line, with the pip command; `train.py --plan` prints it as its error."""


@functools.cache
def _devices(target: GpuTarget, num_devices: int) -> tuple[Any, ...]:
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=target.config_text(), topology=f"1x1x{num_devices}"
        )
    except (RuntimeError, ValueError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PluginMissing(
            "compiling for a GPU without one needs the CUDA plugin (pip install --no-deps "
            f"jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__} "
            "nvidia-cuda-nvcc-cu12 nvidia-nvjitlink-cu12 nvidia-cuda-runtime-cu12), and on a "
            "machine without a GPU JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 set "
            f"before jax starts: {cause}"
        ) from error
    return tuple(topology.devices)


def gpu_devices(target: str | GpuTarget = "h200", num_devices: int = 1) -> list[Any]:
    """Compile-only devices of `num_devices` GPUs of one kind on one host.

    Args:
      target: a name in TARGETS ("a100-40gb", "h100-80gb", "h200") or a GpuTarget.
      num_devices: GPUs (1 and 8 are known to work).

    Returns:
      Devices to build meshes and shardings on; arrays cannot live on them, programs compile
      for them.
    """
    return list(_devices(_target(target), num_devices))


def gpu_mesh(
    target: str | GpuTarget = "h200", num_devices: int = 1, data: int = -1, fsdp: int = 1
) -> Mesh:
    """The trainer's (data, fsdp, tensor) mesh over compile-only GPU devices."""
    from tsld_jax import sharding

    return sharding.make_mesh(data, fsdp, 1, devices=gpu_devices(target, num_devices))


# ------------------------------------------------------------------------------------- TPUs


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU generation as XLA:TPU (libtpu) compiles for it without one (../shared/TPU.md).

    Attributes:
      name: the generation as topology names spell it ("v5e", "v5p", ...).
      device_kind: what the abstract devices report.
      device_memory_size: HBM bytes per JAX device (per chip; v4's abstract topology has one
        device per TensorCore, two a chip, each with half the chip's 32 GiB).
      usable_memory_size: bytes a program may use per device: what XLA:TPU itself allows
        (libtpu 0.0.42.1 refuses a larger program with "exceeds available HBM (15.75G)" for
        v5e, 31.25G v6e, 95.74G v5p, 15.25G v4: the chip less the runtime's reserve).
      dimensions: 2 (v5e, v6e: a 2D torus of chips) or 3 (v4, v5p).
      devices_per_chip: JAX devices a chip.
      cores_per_chip: TensorCores a chip, as Cloud accelerator types count them ("v5p-8" is
        8 TensorCores, 4 chips; "v6e-8" is 8 chips).
    """

    name: str
    device_kind: str
    device_memory_size: int
    usable_memory_size: int
    dimensions: int
    devices_per_chip: int = 1
    cores_per_chip: int = 1

    def topology(self, devices: int) -> tuple[str, int]:
        """(the topology name to ask libtpu for, devices to take from it) for a slice of
        `devices` devices: one host's 2x2(x1) chips and the first `devices` of them below a
        host, else a power-of-two grid grown as Cloud TPU slices are (2x2 -> 2x4 -> 4x4 ...;
        2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 ...)."""
        host = [2, 2] if self.dimensions == 2 else [2, 2, 1]
        chips, rest = divmod(devices, self.devices_per_chip)
        if devices < 1 or rest:
            raise ValueError(f"{self.name}: {devices} devices is not a whole number of chips")
        if chips <= 4:
            return self._name(host), devices
        if chips & (chips - 1):
            raise ValueError(
                f"{self.name}: {chips} chips is not a power of two; name the slice's topology, "
                f"e.g. {self.name}:{'x'.join(['2'] * (self.dimensions - 1) + [str(chips // 2)])}"
            )
        dims = host
        while np.prod(dims) < chips:
            smallest = min(dims)
            last = max(i for i, d in enumerate(dims) if d == smallest)
            dims[last] *= 2
        return self._name(dims), devices

    def _name(self, dims: Sequence[int]) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in dims)}"


GIB = 1024**3
# HBM per chip as Cloud TPU's system-architecture pages give it (v4 32 GiB, v5e 16 GiB, v5p
# 95 GB, v6e 32 GiB); the usable figure is libtpu's own limit (see TpuTarget), which for v5p
# (95.74 GiB) shows the chip's HBM is 96 GiB.
TPU_TARGETS: dict[str, TpuTarget] = {
    "v4": TpuTarget("v4", "TPU v4", 16 * GIB, int(15.25 * GIB), 3, 2, 2),
    "v5e": TpuTarget("v5e", "TPU v5 lite", 16 * GIB, int(15.75 * GIB), 2),
    "v5p": TpuTarget("v5p", "TPU v5", 96 * GIB, int(95.74 * GIB), 3, 1, 2),
    "v6e": TpuTarget("v6e", "TPU v6 lite", 32 * GIB, int(31.25 * GIB), 2),
}


def parse_tpu_slice(text: str) -> tuple[TpuTarget, str, int]:
    """A TPU slice by chips, by topology or by Cloud accelerator type, as (target, the topology
    to ask libtpu for, devices): "v5e:8" (8 chips), "v5p:2x2x1" (that grid of chips), "v5p-8"
    (Cloud's name: 8 TensorCores, 4 chips; "v6e-8" is 8 chips). Raises ValueError."""
    if "-" in text and ":" not in text:
        name, _, cores = text.partition("-")
        if name in TPU_TARGETS and cores.isdigit():
            target = TPU_TARGETS[name]
            chips = int(cores) // target.cores_per_chip
            return (target, *target.topology(chips * target.devices_per_chip))
    name, _, size = text.partition(":")
    if name not in TPU_TARGETS:
        raise ValueError(f"unknown TPU {name!r} in {text!r}; expected one of {sorted(TPU_TARGETS)}")
    target = TPU_TARGETS[name]
    if size.isdigit() and int(size) >= 1:
        return (target, *target.topology(int(size)))
    dims = size.split("x")
    if len(dims) == target.dimensions and all(d.isdigit() and int(d) >= 1 for d in dims):
        return target, text, int(np.prod([int(d) for d in dims])) * target.devices_per_chip
    example = "2x4" if target.dimensions == 2 else "2x2x2"
    raise ValueError(
        f"{text!r}: name a {name} slice by its chips ({name}:8) or its {target.dimensions}D "
        f"topology ({name}:{example})"
    )


def _libtpu_missing(cause: str) -> PluginMissing:
    return PluginMissing(
        f"compiling for a TPU without one needs libtpu (pip install 'jax[tpu]=={jax.__version__}'"
        f", or only its libtpu: pip install --no-deps libtpu==<the version jax[tpu] pins>): "
        f"{cause}"
    )


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # libtpu writes warnings about the TPU VM it is not on (TPU_ACCELERATOR_TYPE,
    # TPU_WORKER_HOSTNAMES) straight to file descriptor 2 when it loads; compiling needs none of
    # what they ask for. They are kept from the CLI's output, and shown if loading fails.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tpu_attached() -> bool:
    # TPU VMs expose their chips as /dev/accel* (v4, v5e) or VFIO groups (v5p, v6e).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


@functools.cache
def _tpu_topology_devices(topology: str) -> tuple[Any, ...]:
    from jax.experimental import topologies

    if not _tpu_attached():
        # Without a TPU there is no metadata server to ask for the slice's shape, and no chip
        # for two processes to contend for: libtpu's one-process-at-a-time lock (which made a
        # second compiling process fail, "Internal error when accessing libtpu multi-process
        # lockfile") guards nothing.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _quiet_stderr():
            topology_desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        if "support not installed" in text:  # jax found no libtpu
            raise _libtpu_missing(first) from error
        raise ValueError(f"TPU topology {topology!r}: {first}") from None
    return tuple(topology_desc.devices)


def tpu_devices(slice_: str) -> list[Any]:
    """Compile-only devices of a TPU slice ("v5e:8", "v5p:2x2x1", "v6e-8"; parse_tpu_slice).

    Returns:
      One device per chip (v4: per TensorCore), to build meshes and shardings on.

    Raises:
      PluginMissing: libtpu is not installed (one line, with the pip command).
      ValueError: the slice is not one libtpu can describe.
    """
    _, topology, count = parse_tpu_slice(slice_)
    return list(_tpu_topology_devices(topology)[:count])


def tpu_mesh(slice_: str, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """The trainer's (data, fsdp, tensor) mesh over a TPU slice's compile-only devices."""
    from tsld_jax import sharding

    return sharding.make_mesh(data, fsdp, tensor, devices=tpu_devices(slice_))


@dataclasses.dataclass(frozen=True)
class MemoryAnalysis:
    """XLA's memory plan of a compiled program, in bytes per device.

    Attributes:
      arguments: the inputs (parameters, optimizer state, batch...).
      outputs: the results.
      aliased: outputs that reuse a donated input's buffer (counted once, in arguments).
      temporaries: activations and scratch live during the program.
      generated_code: the compiled kernels.
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """Peak bytes the program needs on a device: inputs, outputs not aliased to an input,
        temporaries and code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> MemoryAnalysis:
        stats = compiled.memory_analysis()
        return cls(
            arguments=stats.argument_size_in_bytes,
            outputs=stats.output_size_in_bytes,
            aliased=stats.alias_size_in_bytes,
            temporaries=stats.temp_size_in_bytes,
            generated_code=stats.generated_code_size_in_bytes,
        )

    def __str__(self) -> str:
        gb = lambda n: f"{n / 1e9:.3f} GB"
        return (
            f"arguments {gb(self.arguments)}, outputs {gb(self.outputs)} "
            f"(aliased {gb(self.aliased)}), temporaries {gb(self.temporaries)}, "
            f"code {gb(self.generated_code)}, total {gb(self.total)} per device"
        )


class Program(NamedTuple):
    """A jitted function and the abstract arguments to compile it for.

    Attributes:
      fn: the `jax.jit`-ed function (static arguments included in `kwargs`).
      args: positional arguments: pytrees of ShapeDtypeStructs with shardings.
      kwargs: keyword arguments, static ones included.
    """

    fn: Callable
    args: tuple
    kwargs: dict[str, Any]


def lower(program: Program) -> jax.stages.Lowered:
    """Traces and lowers a program for the devices its arguments' shardings name."""
    return program.fn.trace(*program.args, **program.kwargs).lower()


def compile_program(program: Program) -> tuple[jax.stages.Compiled, MemoryAnalysis]:
    """Compiles a program with XLA for the devices of its arguments' shardings.

    Returns:
      (the compiled program, its per-device MemoryAnalysis).

    Raises:
      jax.errors.JaxRuntimeError (XlaRuntimeError): XLA could not compile it; the message
        names the failing instruction and the Python line that made it.
    """
    compiled = lower(program).compile()
    return compiled, MemoryAnalysis.of(compiled)


def compile_programs(
    programs: Mapping[Hashable, Program], max_workers: int | None = None
) -> dict[Hashable, tuple[jax.stages.Compiled, MemoryAnalysis] | Exception]:
    """Compiles many programs, several at a time.

    XLA compiles one program on one core, for tens of seconds for a train step, without
    holding Python's GIL, so threads give a near-linear speed-up. Programs are
    traced and lowered one after the other first (tracing is Python), then compiled in
    `max_workers` threads. (The persistent compilation cache cannot serve them: on jax 0.10.2 a
    GPU executable compiled without a GPU does not deserialize, and jax warns and recompiles.)

    Args:
      programs: name -> Program.
      max_workers: compiles at a time; default: the CPU count, at most 4 (each compile of the
        train step peaks at about 1.5 GB of host memory).

    Returns:
      name -> (compiled, MemoryAnalysis), or the exception that lowering or compiling raised.
    """
    results: dict[Hashable, Any] = {}
    lowered = {}
    for name, program in programs.items():
        try:
            lowered[name] = lower(program)
        except Exception as error:  # reported per program, as the compile errors are
            results[name] = error

    def compile_one(low: jax.stages.Lowered):
        compiled = low.compile()
        return compiled, MemoryAnalysis.of(compiled)

    workers = max_workers or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(compile_one, low) for name, low in lowered.items()}
        for name, future in futures.items():
            error = future.exception()
            results[name] = error if error is not None else future.result()
    return {name: results[name] for name in programs}


# ----------------------------------------------------------------------------- abstract inputs


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _batched(mesh: Mesh, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    from tsld_jax import sharding

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding.batch_sharding(mesh))


def abstract_params(spec: ModelSpec, dtype: Any = jnp.float32) -> Any:
    """The decoder's parameter pytree as ShapeDtypeStructs (no shardings)."""
    from tsld_jax.models import decoder

    return jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, dtype),
        decoder.param_shapes(spec),
        is_leaf=lambda x: isinstance(x, tuple),
    )


MODEL_KINDS = ("float", "fake_quantized", "packed")


def abstract_model(
    spec: ModelSpec,
    mesh: Mesh,
    kind: str = "float",
    quant: Any = None,
    dtype: Any = jnp.float32,
) -> tuple[Any, Callable | None]:
    """Sharded abstract parameters of a model and the quantizer its forward pass takes.

    Args:
      spec: the architecture.
      mesh: where the program runs; parameters are sharded by `sharding.param_shardings`
        (packed weights are replicated).
      kind: "float" (no quantizer), "fake_quantized" (float weights and the quantizer of
        `quant`, as evaluation's --quant runs) or "packed" (`export.export_packed` of `quant`).
      quant: rules, a spec tree or one QuantSpec; None means ternary TWN on every block linear.
      dtype: of the floating parameters.

    Returns:
      (params, quantizer or None).
    """
    from tsld_jax import sharding
    from tsld_jax.quant import export, rules

    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    quant = rules.default_rules() if quant is None else quant
    params = abstract_params(spec, dtype)
    quantizer = rules.make_quantizer(quant) if kind == "fake_quantized" else None
    if kind == "packed":
        params = jax.eval_shape(lambda p: export.export_packed(p, quant), params)
        return jax.tree.map(lambda a: _abstract(a, _replicated(mesh)), params), None
    return _abstract(params, sharding.param_shardings(params, mesh)), quantizer


# ------------------------------------------------------------------------------------ programs


def train_step_program(
    spec: ModelSpec,
    mesh: Mesh,
    *,
    loss: str = "tsld",
    dtype: str = "float32",
    remat: str = "dots",
    batch_size: int = 4,
    length: int = 512,
    quant: Any = None,
    grad_accum: int = 1,
    microbatches: int = 1,
    chunk_size: int = 128,
    teacher_dtype: str = "float32",
) -> Program:
    """The trainer's QAT step, built as the trainer builds it (`train_step.jit_train_step`):
    state sharded by `sharding.state_shardings` and donated, batch split over data x fsdp,
    teacher as an argument, the layers pipelined over the mesh's "stage" axis when it has one.

    Args:
      spec: the architecture (student and teacher).
      mesh: from `gpu_mesh` (or any mesh, e.g. `sharding.make_mesh(..., stage=S)`).
      loss: one of `losses` kinds ("gt", "logit", "logit_gt", "l2l", "tsld").
      dtype: compute dtype, "float32" or "bfloat16" (latent weights stay float32).
      remat: one of `decoder.REMAT_MODES`.
      batch_size: sequences per step.
      length: tokens per sequence (the student reads length - 1).
      quant: rules, a spec tree or a QuantSpec; None means ternary TWN (the default config).
      grad_accum: micro-batches per step.
      microbatches: the pipeline's microbatches (config.train.microbatches).
      chunk_size: the TSLD loss's chunk (0: unchunked).
      teacher_dtype: "float32" or "bfloat16" (config.model.teacher_dtype).
    """
    import ml_collections

    from tsld_jax import train_step
    from tsld_jax.quant import rules

    # configs/base.py's optimizer defaults; the numbers do not change what compiles.
    train_cfg = ml_collections.ConfigDict(
        {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0}
        | {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
        | {"grad_accum": grad_accum, "dtype": dtype, "remat": remat, "microbatches": microbatches}
    )
    loss_cfg = ml_collections.ConfigDict(
        {"kind": loss, "temperature": 10.0, "chunk_size": chunk_size}
    )
    optimizer, _ = train_step.make_optimizer(train_cfg, 1000)
    params = abstract_params(spec)
    state = jax.eval_shape(lambda p: train_step.init_state(p, optimizer, 0), params)
    step = train_step.jit_train_step(
        spec,
        rules.default_rules() if quant is None else quant,
        loss_cfg,
        train_cfg,
        optimizer,
        state,
        mesh,
        params,
        teacher_dtype,
    )
    return Program(step.fn, step.abstract_args(state, (batch_size, length), params), {})


def forward_program(
    spec: ModelSpec,
    mesh: Mesh,
    *,
    kind: str = "float",
    quant: Any = None,
    dtype: Any = jnp.float32,
    batch_size: int = 4,
    length: int = 512,
) -> Program:
    """Evaluation's forward pass: perplexity's jitted per-block losses."""
    from tsld_jax.evaluation import perplexity

    params, quantizer = abstract_model(spec, mesh, kind, quant, dtype)
    tokens = _batched(mesh, (batch_size, length), jnp.int32)
    return Program(
        perplexity._jitted_block_losses,
        (params, tokens),
        {"spec": spec, "quantizer": quantizer, "loss_mask_BxT": None, "attention_mask_BxT": None},
    )


def choice_program(
    spec: ModelSpec,
    mesh: Mesh,
    *,
    kind: str = "float",
    quant: Any = None,
    dtype: Any = jnp.float32,
    batch_size: int = 8,
    context: int = 256,
    choices: int = 4,
    width: int = 32,
) -> Program:
    """Multiple-choice scoring as `choice.loglikelihoods` runs it by default: each context once
    into a KV cache, then its `choices` continuations of up to `width` tokens against it."""
    from tsld_jax.evaluation import choice

    params, quantizer = abstract_model(spec, mesh, kind, quant, dtype)
    rows = batch_size * choices
    args = (
        params,
        _batched(mesh, (batch_size, context), jnp.int32),
        _batched(mesh, (batch_size, context), jnp.int32),
        _batched(mesh, (rows,), jnp.int32),
        _batched(mesh, (rows, width), jnp.int32),
        _batched(mesh, (rows, width), jnp.int32),
    )
    return Program(choice._score_shared, args, {"spec": spec, "quantizer": quantizer})


def prefill_program(
    spec: ModelSpec,
    mesh: Mesh,
    *,
    kind: str = "float",
    quant: Any = None,
    dtype: Any = jnp.float32,
    batch_size: int = 8,
    prompt: int = 512,
    new_tokens: int = 256,
    packed_kernel: str = "auto",
) -> Program:
    """Generation's prefill: the padded prompts into a KV cache of prompt + new_tokens slots."""
    from tsld_jax import generate

    params, quantizer = abstract_model(spec, mesh, kind, quant, dtype)
    tokens = _batched(mesh, (batch_size, prompt), jnp.int32)
    return Program(
        generate._prefill,
        (params, tokens, tokens),
        {
            "spec": spec,
            "quantizer": quantizer,
            "cache_length": prompt + new_tokens,
            "packed_kernel": packed_kernel,
        },
    )


def decode_program(
    spec: ModelSpec,
    mesh: Mesh,
    *,
    kind: str = "float",
    quant: Any = None,
    dtype: Any = jnp.float32,
    batch_size: int = 8,
    cache_length: int = 768,
    steps: int = 16,
    packed_kernel: str = "auto",
) -> Program:
    """Generation's decode chunk: `steps` greedy tokens fed back through the KV cache."""
    from tsld_jax import generate
    from tsld_jax.models import decoder

    params, quantizer = abstract_model(spec, mesh, kind, quant, dtype)
    cache = jax.eval_shape(lambda: decoder.init_cache(spec, batch_size, cache_length, dtype))
    cache = jax.tree.map(lambda a: _abstract(a, _replicated(mesh)), cache)
    args = (
        params,
        cache,
        _batched(mesh, (batch_size, spec.vocab_size), jnp.float32),
        _batched(mesh, (batch_size,), jnp.bool_),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=_replicated(mesh)),
    )
    kwargs = {
        "spec": spec,
        "quantizer": quantizer,
        "steps": steps,
        "sampling": generate.GREEDY,
        "eos_ids": (),
        "pad_id": 0,
        "packed_kernel": packed_kernel,
    }
    return Program(generate._decode_chunk, args, kwargs)


def quantized_matmul_program(
    quant_spec: Any,
    mesh: Mesh,
    *,
    rows: int,
    in_features: int,
    out_features: int,
    dtype: Any = jnp.bfloat16,
    block_sizes: Any = None,
) -> Program:
    """One launch of the Pallas kernel `pallas.quantized_matmul` (the launch `rows` selects,
    unless `block_sizes` is given), replicated on the mesh."""
    from pallas import quantized_matmul as qmm
    from tsld_jax.quant import qtensor

    packed = jax.eval_shape(
        lambda w: qtensor.pack(w, quant_spec),
        jax.ShapeDtypeStruct((in_features, out_features), jnp.float32),
    )
    replicated = _replicated(mesh)
    x = jax.ShapeDtypeStruct((rows, in_features), dtype, sharding=replicated)
    packed = jax.tree.map(lambda a: _abstract(a, replicated), packed)
    return Program(qmm.quantized_matmul, (x, packed), {"block_sizes": block_sizes})

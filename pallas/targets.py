"""Naming the GPU that a Pallas kernel is lowered for when the host has none.

Pallas' Triton lowering asks which GPU it targets, to pick the compute capability it writes into
the Triton module. jax <= 0.10 read it from a local GPU and fell back to sm_90 without one; from
jax 0.11 it reads the device kind of the abstract mesh in context and raises without either. So
cross-lowering (`jax.export` with `platforms=("cuda",)`, deviceless AOT) names its target:

    with targets.abstract_gpu("NVIDIA A100-SXM4-40GB"):
        jax.export.export(fn, platforms=("cuda",), ...)(*args)

On jax 0.10 the context is accepted and the kind is ignored (the Triton module says sm_90).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

# Device kinds as the CUDA runtime reports them; Pallas maps a kind to its compute capability.
A100 = "NVIDIA A100-SXM4-40GB"  # sm_80
H100 = "NVIDIA H100 80GB HBM3"  # sm_90
H200 = "NVIDIA H200"  # sm_90
BY_ARCH = {80: A100, 90: H200}


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H200) -> Iterator[None]:
    """Lowers the enclosed traces for an NVIDIA GPU of `device_kind`, present or not.

    The abstract mesh has one device and an `Auto` axis, so it changes no sharding decision: only
    what Pallas reads as the target GPU.
    """
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("gpu",), (jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def current_arch(default: int = 90) -> int:
    """The compute capability (80, 90 ...) the enclosed traces are lowered for.

    The abstract GPU of `abstract_gpu` where one is in context, else the first local GPU, else
    `default` (CPU hosts: interpret mode, where the launch only has to be correct).
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    kind = getattr(device, "device_kind", None) if device is not None else None
    if kind:
        return 80 if "A100" in kind or "A10" in kind else 90
    for device in jax.devices():
        capability = getattr(device, "compute_capability", None)
        if device.platform == "gpu" and capability:
            return int(str(capability).replace(".", ""))
    return default


@contextlib.contextmanager
def abstract_tpu(device_kind: str = "TPU v5 lite", num_cores: int = 1) -> Iterator[None]:
    """Lowers the enclosed traces' Pallas kernels for a TPU of `device_kind`, present or not.

    Pallas' Mosaic lowering reads the chip (its generation, VMEM, vreg shape) from the abstract
    mesh's device, else from the default device, which is the CPU in a deviceless compile. Take
    the kind and cores from `jax.experimental.topologies` devices (`device.device_kind`,
    `device.num_cores`).
    """
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="tpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("tpu",), (jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        yield

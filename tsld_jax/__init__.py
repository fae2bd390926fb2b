"""tsld-jax: ternary QAT with Token-Scaled Logit Distillation, in JAX."""

import glob
import importlib.util
import os

__version__ = "0.1.0"

# The CUDA plugin is installed beside jax on machines without a GPU too, for deviceless GPU
# compiles (tsld_jax.aot, `make test`). There jax's CUDA version check, run when the first
# backend starts, finds no cuDNN and prints a long traceback before falling back to the CPU.
# With no NVIDIA driver on the machine the check has nothing to protect, so it is skipped; on a
# machine with one it runs as jax intends.
if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

# Likewise libtpu, installed for deviceless TPU compiles (tsld_jax.aot, `make test`): where no TPU
# and no NVIDIA GPU is attached, jax would still load it as a backend when it starts, and it
# writes warnings about the TPU VM it is not on (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES)
# before jax falls back to the CPU. There the CPU is the only backend jax can start, so it is
# named; the TPU compiles load libtpu on their own (aot.tpu_devices), quietly.
if (
    "JAX_PLATFORMS" not in os.environ
    and not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl"))
    and not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    and importlib.util.find_spec("libtpu") is not None
):
    os.environ["JAX_PLATFORMS"] = "cpu"

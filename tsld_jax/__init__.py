"""tsld-jax: ternary QAT with Token-Scaled Logit Distillation, in JAX."""

import os

__version__ = "0.1.0"

# The CUDA plugin is installed beside jax on machines without a GPU too, for deviceless GPU
# compiles (tsld_jax.aot, `make test`). There jax's CUDA version check, run when the first
# backend starts, finds no cuDNN and prints a long traceback before falling back to the CPU.
# With no NVIDIA driver on the machine the check has nothing to protect, so it is skipped; on a
# machine with one it runs as jax intends.
if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

"""Compile the quantized-matmul launches for NVIDIA GPUs without one, and read the result.

Lowers each launch of `pallas.quantized_matmul` (decode and prefill, W2/W4/W8A16, bf16 or
float32 activations) through Pallas' Triton rules for a CUDA target (`jax.export` cross-lowering: no
GPU needed), then, when the `triton` package is importable, compiles the Triton IR for each
target architecture (sm_80 = A100, sm_90 = H100/H200) with the launch's warps and stages, and
prints what the compiler reports: shared memory, registers, stack (spills), and the counts of
the instructions that matter (HGMMA/HMMA tensor-core ops, I2F conversions, LDGSTS async copies).
It answers "does it compile, does it fit, does it spill, which matrix instructions" at no device
time; it does not time anything (bench/kernels.py does, on a GPU).

CPU-only jax does not need triton; to run the compile step, install it aside:

    pip install --no-deps --target /tmp/tritonsite triton==3.9.0
    PYTHONPATH=/tmp/tritonsite python bench/kernels_static.py [--sizes 8192] [--arch 80 90]

The Triton IR is captured by wrapping a private jax function
(`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`); if a jax release renames it,
this script says so and stops.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas import quantized_matmul as qmm  # noqa: E402
from pallas import targets  # noqa: E402
from tsld_jax.quant import qtensor  # noqa: E402
from tsld_jax.quant.quantizers import QuantSpec  # noqa: E402

FORMATS = {
    "w2a16": QuantSpec("twn", 2, "channel"),
    "w4a16": QuantSpec("asym", 4, "group", 128),
    "w8a16": QuantSpec("sym", 8, "channel"),
}
_OPS = ("HGMMA", "HMMA", "I2F", "LDGSTS", "LDG", "LDS", "STS", "LOP3", "SHF")


def triton_ir(x_shape, packed, blocks, dtype=jnp.bfloat16, arch: int = 90) -> str:
    """The Triton IR text of one launch, captured while cross-lowering for CUDA sm_<arch>."""
    try:
        registration = importlib.import_module("jax._src.pallas.triton.pallas_call_registration")
        lower = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"this jax has no Pallas Triton lowering hook to wrap: {e}") from e
    captured = []

    def wrapped(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        fn = jax.jit(lambda x, p: qmm.quantized_matmul(x, p, block_sizes=blocks))
        # jax >= 0.11 reads the target GPU from an abstract device (none is needed on 0.10).
        with targets.abstract_gpu(targets.BY_ARCH[arch]):
            jax.export.export(
                fn,
                platforms=("cuda",),
                disabled_checks=[
                    jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
                ],
            )(jax.ShapeDtypeStruct(x_shape, dtype), packed)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    (ir,) = captured
    return ir


def _count(opcode: str, sass: str) -> int:
    return len(re.findall(r"\b" + opcode + r"\b", sass))


def compile_report(ir_path: str, arch: int, num_warps: int, num_stages: int) -> str:
    """Compiles Triton IR for sm_<arch> and summarises resources and instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(
        ir_path,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cubin = ir_path[: -len(".ttir")] + ".cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run(
        [os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True
    ).stdout
    sass = subprocess.run(
        [os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True
    ).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    counts = " ".join(f"{op}={_count(op, sass)}" for op in _OPS)
    return (
        f"shared={kernel.metadata.shared:>6} regs={regs.group(1) if regs else '?':>3} "
        f"stack={stack.group(1) if stack else '?':>4} {counts}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512, 4096])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", help="keep the .ttir and .cubin files here")
    args = parser.parse_args()
    try:
        importlib.import_module("triton")
        have_triton = True
    except ImportError:
        have_triton = False
        print("triton is not importable: lowering only (see the module docstring)")
    out = args.out or tempfile.mkdtemp(prefix="quantized_matmul_")
    os.makedirs(out, exist_ok=True)
    for k in args.sizes:
        for name, spec in FORMATS.items():
            packed = jax.eval_shape(
                lambda w, spec=spec: qtensor.pack(w, spec),
                jax.ShapeDtypeStruct((k, k), jnp.float32),
            )
            for m in args.rows:
                launch = qmm.select_block_sizes(m, args.dtype)
                blocks, _ = qmm._fit(launch, packed, m)
                launch = (
                    f"{name} K=N={k} M={m:<5} tile {blocks.block_m}x{blocks.block_n}x"
                    f"{blocks.block_k} splits={blocks.k_splits} warps={blocks.num_warps} "
                    f"stages={blocks.num_stages}"
                )
                for arch in args.arch:
                    # Lowered per target: from jax 0.11 the Triton module records the arch.
                    ir = triton_ir((m, k), packed, blocks, jnp.dtype(args.dtype), arch)
                    path = os.path.join(out, f"{name}_k{k}_m{m}.sm{arch}.ttir")
                    with open(path, "w") as f:
                        f.write(ir)
                    if not have_triton:
                        print(f"{launch} sm_{arch}: lowered ({len(ir)} chars of Triton IR)")
                        continue
                    try:
                        report = compile_report(path, arch, blocks.num_warps, blocks.num_stages)
                    except Exception as e:  # a compile failure is a finding, not a crash
                        report = f"FAILED {type(e).__name__}: {str(e)[:300]}"
                    print(f"{launch} sm_{arch}: {report}", flush=True)
    print(f"files in {out}")


if __name__ == "__main__":
    main()

"""Compile the quantized-matmul launches for NVIDIA GPUs without one, and read the result.

Lowers each launch of `pallas.quantized_matmul` (decode and prefill, W2/W4/W8A16, bf16 or
float32 activations) through Pallas' Triton rules for a CUDA target (`jax.export` cross-lowering: no
GPU needed), then, when the `triton` package is importable, compiles the Triton IR for each
target architecture (sm_80 = A100, sm_90 = H100/H200) with the launch's warps and stages, and
prints what the compiler reports: shared memory, registers, stack (spills), and the counts of
the instructions that matter (HGMMA/HMMA tensor-core ops, I2F conversions, LDGSTS async copies).
It answers "does it compile, does it fit, does it spill, which matrix instructions" at no device
time; it does not time anything (bench/kernels_speed.py does, on a GPU).

It also predicts each launch's time from the compiled code (`predict`): the K loop's body in
the SASS (the span of the backward branch that holds the matrix instructions) is what every
thread executes once per K tile, so `instructions_per_weight` = body instructions x threads /
(block_k x block_n) is exact for the steady state. The predicted time is the largest of three
floors: the bytes moved (packed weights and scales, activations, output) at the GPU's
bandwidth, the thread-instructions at 128 a clock per SM (4 schedulers x 32 lanes), and the
padded matrix FLOPs at the tensor cores' dense bf16 peak; a launch with fewer programs than SMs
gets only that share of the bandwidth and of the SMs. The bf16 baseline is XLA's dot at its
roofline (the larger of its bytes and its FLOPs floors). `--json PATH` writes every launch.

CPU-only jax does not need triton; to run the compile step, install it aside:

    pip install --no-deps --target /tmp/tritonsite triton==3.9.0
    PYTHONPATH=/tmp/tritonsite python bench/kernels_static.py [--shapes 8192x8192] [--arch 80 90] \
        [--json docs/kernels_static.json]

The Triton IR is captured by wrapping a private jax function
(`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`); if a jax release renames it,
this script says so and stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
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
_MMA = ("HGMMA", "HMMA")
# The paper's models' matmul shapes (K x N): square ones, and LLaMA-7B's MLP (up/gate 4096 x
# 11008, down 11008 x 4096).
SHAPES = ("4096x4096", "8192x8192", "4096x11008", "11008x4096")
ROWS = (1, 16, 64, 4096)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the prediction needs of a GPU (datasheet figures, dense bf16)."""

    name: str
    sms: int
    clock_hz: float  # sustained SM clock
    bandwidth: float  # bytes/s of HBM
    bf16_flops: float  # dense tensor-core FLOP/s


# sm_80 -> A100-40GB (SXM), sm_90 -> H100 SXM.
GPUS = {
    80: Gpu("a100-40gb", sms=108, clock_hz=1.41e9, bandwidth=1.555e12, bf16_flops=312e12),
    90: Gpu("h100", sms=132, clock_hz=1.755e9, bandwidth=3.35e12, bf16_flops=989e12),
}
_ISSUE_PER_CLOCK = 128  # thread-instructions per SM per clock: 4 warp schedulers x 32 lanes
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")


def loop_body(sass: str) -> list[str]:
    """The opcodes of the K loop: the longest backward branch's span that holds an MMA.

    A launch of one K step per program has no K loop (the compiler drops a one-trip loop):
    then the whole kernel is what a program runs for its one tile, and is returned.
    """
    opcodes, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        opcodes.append(instruction.group(1))
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels:  # a label already seen: a backward branch
            loops.append(opcodes[labels[branch.group(1)] :])
    with_mma = [body for body in loops if any(op in _MMA for op in body)]
    return max(with_mma, key=len) if with_mma else opcodes


def packed_bytes(packed) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(packed))


def predict(gpu: Gpu, k: int, n: int, m: int, blocks, body: int, weight_bytes: int) -> dict:
    """Predicted time of one launch (seconds) and its floors; see the module docstring."""
    mp = -(-m // blocks.block_m) * blocks.block_m
    tiles = (mp // blocks.block_m) * (n // blocks.block_n)
    programs = tiles * blocks.k_splits
    share = min(1.0, programs / gpu.sms)
    threads = blocks.num_warps * 32
    instructions_per_weight = body * threads / (blocks.block_k * blocks.block_n)
    # Every M tile reads (and unpacks) all of the weights once, and splits that overrun the K
    # tiles run their extra (zero-activation) steps too.
    k_tiles = -(-k // blocks.block_k)
    k_run = blocks.k_splits * -(-k_tiles // blocks.k_splits) * blocks.block_k
    thread_instructions = instructions_per_weight * k_run * n * (mp // blocks.block_m)
    moved = weight_bytes + m * k * 2 + m * n * 2
    floors = {
        "memory": moved / (gpu.bandwidth * share),
        "issue": thread_instructions / (gpu.sms * share * _ISSUE_PER_CLOCK * gpu.clock_hz),
        "tensor": 2 * mp * n * k_run / (gpu.bf16_flops * share),
    }
    bf16 = max((k * n + m * k + m * n) * 2 / gpu.bandwidth, 2 * m * n * k / gpu.bf16_flops)
    predicted = max(floors.values())
    return {
        "gpu": gpu.name,
        "programs": programs,
        "sm_share": share,
        "instructions_per_weight": instructions_per_weight,
        "floors_us": {name: t * 1e6 for name, t in floors.items()},
        "bound": max(floors, key=floors.get),
        "predicted_us": predicted * 1e6,
        "bf16_us": bf16 * 1e6,
        "predicted_speedup_vs_bf16": bf16 / predicted,
    }


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


def _make_ttir(ir_path: str, arch: int) -> str:
    """Runs Triton's first stage (`make_ttir`: canonicalize, combine, CSE ...) on the lowered IR.

    `triton.compile` skips that stage for an IR file (it takes the file as already made), but
    XLA runs the same passes first when it compiles a Pallas kernel, and they matter: the
    combine pass folds `acc + dot(a, b)` into the dot's accumulator. Returns the new path.
    """
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(ir_path, context)
    module.context = context
    backend.make_ttir(module, {}, None, arch)
    made = ir_path[: -len(".ttir")] + ".made.ttir"
    with open(made, "w") as f:
        f.write(str(module))
    return made


def compile_report(ir_path: str, arch: int, num_warps: int, num_stages: int) -> dict:
    """Compiles Triton IR for sm_<arch>: resources, whole-kernel and K-loop instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(
        _make_ttir(ir_path, arch),
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
    body = loop_body(sass)
    loop_counts: dict[str, int] = {}
    for op in body:
        loop_counts[op] = loop_counts.get(op, 0) + 1
    return {
        "shared_bytes": kernel.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "kernel_counts": {op: _count(op, sass) for op in _OPS},
        "loop_instructions": len(body),
        "loop_counts": dict(sorted(loop_counts.items(), key=lambda kv: -kv[1])),
    }


def _summary(report: dict) -> str:
    counts = " ".join(f"{op}={n}" for op, n in report["kernel_counts"].items())
    return (
        f"shared={report['shared_bytes']:>6} regs={report['registers']!s:>3} "
        f"stack={report['stack_bytes']!s:>4} loop={report['loop_instructions']} {counts}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="KxN weight shapes")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", help="keep the .ttir and .cubin files here")
    parser.add_argument("--json", help="write every launch's figures to this file")
    args = parser.parse_args()
    try:
        importlib.import_module("triton")
        have_triton = True
    except ImportError:
        have_triton = False
        print("triton is not importable: lowering only (see the module docstring)")
    if args.json and not have_triton:
        raise SystemExit("error: --json needs the compile step (triton importable)")
    out = args.out or tempfile.mkdtemp(prefix="quantized_matmul_")
    os.makedirs(out, exist_ok=True)
    records = []
    for shape in args.shapes:
        k, n = (int(x) for x in shape.lower().split("x"))
        for name in args.formats:
            spec = FORMATS[name]
            packed = jax.eval_shape(
                lambda w, spec=spec: qtensor.pack(w, spec),
                jax.ShapeDtypeStruct((k, n), jnp.float32),
            )
            for m in args.rows:
                for arch in args.arch:
                    launch = qmm.select_block_sizes(m, args.dtype, arch)
                    blocks, _ = qmm._fit(launch, packed, m)
                    title = (
                        f"{name} K={k} N={n} M={m:<5} tile {blocks.block_m}x{blocks.block_n}x"
                        f"{blocks.block_k} splits={blocks.k_splits} warps={blocks.num_warps} "
                        f"stages={blocks.num_stages}"
                    )
                    # Lowered per target: from jax 0.11 the Triton module records the arch.
                    ir = triton_ir((m, k), packed, blocks, jnp.dtype(args.dtype), arch)
                    path = os.path.join(out, f"{name}_k{k}_n{n}_m{m}.sm{arch}.ttir")
                    with open(path, "w") as f:
                        f.write(ir)
                    if not have_triton:
                        print(f"{title} sm_{arch}: lowered ({len(ir)} chars of Triton IR)")
                        continue
                    record = {
                        "format": name, "k": k, "n": n, "m": m, "arch": f"sm_{arch}",
                        "dtype": args.dtype, "blocks": dataclasses.asdict(blocks),
                    }  # fmt: skip
                    try:
                        report = compile_report(path, arch, blocks.num_warps, blocks.num_stages)
                    except Exception as e:  # a compile failure is a finding, not a crash
                        record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"{title} sm_{arch}: FAILED {record['error']}", flush=True)
                        records.append(record)
                        continue
                    record |= report
                    record |= predict(
                        GPUS[arch], k, n, m, blocks, report["loop_instructions"],
                        packed_bytes(packed),
                    )  # fmt: skip
                    records.append(record)
                    print(
                        f"{title} sm_{arch}: {_summary(report)} | "
                        f"{record['instructions_per_weight']:.2f} instr/weight, "
                        f"{record['gpu']} {record['predicted_us']:.1f} us ({record['bound']}), "
                        f"{record['predicted_speedup_vs_bf16']:.2f}x bf16",
                        flush=True,
                    )
    print(f"files in {out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "launches": records}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Compile the TPU quantized-matmul launches for TPU v5e and v6e without a TPU, and read the result.

Compiles each launch of `pallas.quantized_matmul_tpu` (decode and prefill, W2/W4/W8A16, bf16
activations) with libtpu's compiler for one abstract device of a `jax.experimental.topologies`
TPU topology, with Mosaic's LLO dumps on, and reads what the compiled program shows:

- `vmem_bytes`: the scoped VMEM the compiled custom call reserves (its tiles, double buffers and
  scratch), from `used_scoped_memory_configs` in the compiled HLO;
- the HBM figures of `compiled.memory_analysis()` (arguments, output, temporaries);
- from the kernel's final VLIW schedule (`*-schedule-analysis_final_bundles.txt`,
  `*-final_hlo-static-per-bundle-utilization.txt`): its bundles, the grid loop's bundles per
  step (the span of the one loop; every launch here compiles to one straight-line step body),
  and the slots each unit uses (VALU, MXU, vector loads/stores, spill fills and stores).

`compiled.cost_analysis()` is not used: for a Mosaic custom call XLA has no cost model, so its
flops and bytes are those of the wrapper's ops or -1.

It predicts each launch's time as the larger of two floors: the step bodies' bundles at the
chip's clock (a bundle issues per cycle; the DMA of the next tiles overlaps, Pallas double
buffers), and the bytes moved (packed weights and scales, x once per N block, output) at HBM
bandwidth. The bf16 baseline is XLA's dot at its roofline (the larger of its weight bytes at
HBM bandwidth and its FLOPs at the MXUs' peak). Datasheet figures: v5e 819 GB/s, 197 TFLOP/s
bf16, 4 MXUs of 128x128 per core, hence 1.5 GHz; v6e 1640 GB/s, 918 TFLOP/s, 4 MXUs of 256x256,
hence 1.75 GHz (the clocks are inferred from the peaks, not published figures).

    pip install --no-deps --target /work/tpu_libs libtpu==0.0.42.1   # jax 0.10.2's libtpu
    PYTHONPATH=.:/work/tpu_libs JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 \
        python bench/kernels_static_tpu.py [--chips v5e v6e] [--json docs/kernels_static_tpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix="mosaic_llo_")
# libtpu reads its flags once, when it is first loaded: before jax touches a TPU.
os.environ["LIBTPU_INIT_ARGS"] = (
    os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_jf_dump_to={_DUMP}"
).strip()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to lock: other compiles may run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas import quantized_matmul_tpu as qmm_tpu  # noqa: E402
from pallas import targets  # noqa: E402
from tsld_jax.quant import qtensor  # noqa: E402
from tsld_jax.quant.quantizers import QuantSpec  # noqa: E402

FORMATS = {
    "w2a16": QuantSpec("twn", 2, "channel"),
    "w4a16": QuantSpec("asym", 4, "group", 128),
    "w8a16": QuantSpec("sym", 8, "channel"),
}
SHAPES = ((4096, 4096), (8192, 8192), (4096, 11008), (11008, 4096))
ROWS = (1, 64, 4096)
CHIPS = {
    # topology, HBM bytes/s, bf16 FLOP/s, clock Hz (inferred: peak / (4 MXUs x MACs x 2))
    "v5e": ("v5e:2x2", 819e9, 197e12, 1.5e9),
    "v6e": ("v6e:2x2", 1640e9, 918e12, 1.75e9),
}
_UNITS = ("MXU", "XLU", "VALU", "VPOP", "EUP", "VLOAD", "VLOAD:FILL", "VSTORE", "VSTORE:SPILL")


def _kernel_dumps(before: set[str]) -> tuple[str, str]:
    """The final schedule and utilization dumps of the one kernel compiled since `before`."""
    new = sorted(set(glob.glob(os.path.join(_DUMP, "*quantized_matmul_tpu*"))) - before)
    bundles = [f for f in new if f.endswith("-final_bundles.txt")]
    usage = [f for f in new if f.endswith("final_hlo-static-per-bundle-utilization.txt")]
    if len(bundles) != 1 or len(usage) != 1:
        raise SystemExit(f"error: expected one kernel's LLO dumps in {_DUMP}, found {new[:4]}")
    return bundles[0], usage[0]


def read_schedule(bundles_text: str, usage_text: str) -> dict:
    """Bundles, the grid loop's bundles per step, and the slots used per unit, from the dumps."""
    lines = usage_text.splitlines()
    header = lines[lines.index("== CAPACTIY:") + 1].replace(",", " ").split()
    rows = [list(map(int, line.split())) for line in lines if re.fullmatch(r"[\d ]+", line)]
    rows = rows[1:]  # the first numeric row is the capacity
    totals = {unit: sum(r[i] for r in rows) for i, unit in enumerate(header) if unit in _UNITS}
    addresses = re.findall(r"^\s*(0x[0-9a-f]+)\s+LB:", bundles_text, flags=re.M)
    exits = re.findall(r"^\s*(0x[0-9a-f]+) .*loop exit test", bundles_text, flags=re.M)
    loops = len(addresses)
    step = int(exits[-1], 16) - int(addresses[0], 16) + 1 if loops == 1 and exits else None
    return {"bundles": len(rows), "loops": loops, "bundles_per_step": step, "slots": totals}


def _bytes_moved(packed, rows: int, fitted, mp: int) -> int:
    kp, np_ = packed.padded_shape
    weights = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(packed))
    x = mp * kp * 2 * (np_ // fitted.block_n)  # x's tiles are read again for every N block
    return weights + x + mp * np_ * 2


def launch(chip: str, device, name: str, k: int, n: int, rows: int) -> dict:
    _, bandwidth, flops, clock = CHIPS[chip]
    spec = FORMATS[name]
    sharding = jax.sharding.SingleDeviceSharding(device)
    packed = jax.eval_shape(
        lambda w: qtensor.pack(w, spec), jax.ShapeDtypeStruct((k, n), jnp.float32)
    )
    packed = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), packed
    )
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16, sharding=sharding)
    blocks = qmm_tpu.select_block_sizes(rows)
    fitted, mp = qmm_tpu._fit(blocks, packed, rows)
    before = set(glob.glob(os.path.join(_DUMP, "*")))
    compiled = jax.jit(lambda x, p: qmm_tpu.quantized_matmul(x, p)).lower(x, packed).compile()
    bundles_file, usage_file = _kernel_dumps(before)
    with open(bundles_file) as b, open(usage_file) as u:
        schedule = read_schedule(b.read(), u.read())
    memory = compiled.memory_analysis()
    kp, np_ = packed.padded_shape
    steps = (mp // fitted.block_m) * (np_ // fitted.block_n) * (kp // fitted.block_k)
    moved = _bytes_moved(packed, rows, fitted, mp)
    issue_s = steps * schedule["bundles_per_step"] / clock if schedule["bundles_per_step"] else None
    kernel_s = max(moved / bandwidth, issue_s or 0.0)
    bf16_s = max(k * n * 2 / bandwidth, 2 * rows * k * n / flops)
    weights_per_step = fitted.block_k * fitted.block_n
    return {
        "chip": chip,
        "device_kind": device.device_kind,
        "format": name,
        "k": k,
        "n": n,
        "m": rows,
        "blocks": {"block_m": fitted.block_m, "block_n": fitted.block_n, "block_k": fitted.block_k},
        "grid_steps": steps,
        "vmem_bytes": qmm_tpu.scoped_vmem_bytes(compiled.as_text()),
        "hbm_argument_bytes": memory.argument_size_in_bytes,
        "hbm_output_bytes": memory.output_size_in_bytes,
        "hbm_temp_bytes": memory.temp_size_in_bytes,
        **schedule,
        "valu_ops_per_1024_weights": (
            schedule["slots"].get("VALU", 0) / (weights_per_step / 1024)
            if schedule["loops"] == 1
            else None
        ),
        "bytes_moved": moved,
        "predicted_us": kernel_s * 1e6,
        "issue_bound": bool(issue_s and issue_s > moved / bandwidth),
        "bf16_roofline_us": bf16_s * 1e6,
        "predicted_speedup_vs_bf16": bf16_s / kernel_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES])
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--json", help="write every launch's figures to this file")
    args = parser.parse_args()
    from jax.experimental import topologies

    records = []
    for chip in args.chips:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=CHIPS[chip][0])
        device = topology.devices[0]
        with targets.abstract_tpu(device.device_kind, device.num_cores):
            for shape in args.shapes:
                k, n = map(int, shape.split("x"))
                for name in args.formats:
                    for rows in args.rows:
                        r = launch(chip, device, name, k, n, rows)
                        records.append(r)
                        print(
                            f"{chip} {name} {k}x{n} m={rows}: tile {r['blocks']} "
                            f"vmem {r['vmem_bytes'] / 2**20:.2f} MiB, {r['bundles_per_step']} "
                            f"bundles/step, VALU {r['valu_ops_per_1024_weights']}/1024 w, "
                            f"spills {r['slots'].get('VSTORE:SPILL')}, "
                            f"{r['predicted_us']:.1f} us vs bf16 {r['bf16_roofline_us']:.1f} us "
                            f"({r['predicted_speedup_vs_bf16']:.2f}x)",
                            flush=True,
                        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "jax": jax.__version__,
                    "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.machine()} CPU host, no TPU (libtpu's compiler)",
                    "launches": records,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

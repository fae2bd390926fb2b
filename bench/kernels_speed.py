"""Packed weight-only matmuls (W2A16, W4A16, W8A16) against XLA's bf16 dot, on one GPU.

For K = N in {4096, 8192, 16384} and M in {1, 16, 64, 512, 4096}: the median time of each
product after warm-up, its speedup over the bf16 dot, and the bytes it must move (packed
weights with scales and zero points, activations, output) per second as a fraction of the
device's measured copy bandwidth (a large device-to-device copy, read plus write).

    python bench/kernels_speed.py                      # the full sweep (GPU)
    python bench/kernels_speed.py --smoke              # tiny shapes, interpret mode: runs on a CPU
    python bench/kernels_speed.py --sizes 8192 --rows 1 --json out.json

Timing: each measured call is one jitted function that multiplies by `copies` distinct weight
buffers in turn (enough to exceed the L2 cache several times, so the weights come from HBM,
as in decoding a real model), timed on the host around `block_until_ready` and divided by
`copies`; the median over `--repeats` such calls is reported. Launch gaps between the
products inside the call are included, so the figures bound the device time from above.
Formats: W2A16 = ternary TWN per channel; W4A16 = asymmetric 4-bit, groups of 128; W8A16 =
symmetric int8 per channel; activations bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from median_time import median_seconds  # noqa: E402 (bench/, the script's own folder)

from pallas import quantized_matmul as qmm  # noqa: E402
from tsld_jax.quant import qtensor  # noqa: E402
from tsld_jax.quant.quantizers import QuantSpec  # noqa: E402

FORMATS = {
    "w2a16": QuantSpec("twn", 2, "channel"),
    "w4a16": QuantSpec("asym", 4, "group", 128),
    "w8a16": QuantSpec("sym", 8, "channel"),
}
_CACHE_BYTES = 256 * 2**20  # weights rotated per timed call: several times an H100's 50 MB L2


def _timed(fn, args, repeats: int) -> float:
    # Two warm-ups: compilation, then Triton's autotuning, stay out.
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=2)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), median of repeats."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    fn = jax.jit(lambda a: a + 1.0)  # one read and one write per element; cannot be elided
    return 2 * a.nbytes / _timed(fn, (a,), repeats)


def _rotated(make, nbytes: int, max_copies: int) -> list:
    copies = int(max(1, min(max_copies, -(-_CACHE_BYTES // max(nbytes, 1)))))
    return [make(i) for i in range(copies)]


def bench_case(k, m, name, *, repeats, interpret, blocks, max_copies, rng):
    """Seconds per product and bytes moved, for one format ("bf16" or a FORMATS key)."""
    n = k
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    out_bytes = m * n * 2 + x.nbytes
    if name == "bf16":

        def make(i):
            return jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02

        weights = _rotated(make, k * n * 2, max_copies)
        fn = jax.jit(lambda x, *ws: [jnp.dot(x, w, preferred_element_type=jnp.float32)
                                      .astype(x.dtype) for w in ws])  # fmt: skip
        weight_bytes = k * n * 2
    else:
        spec = FORMATS[name]
        pack = jax.jit(qtensor.pack, static_argnums=(1,))

        def make(i):
            w = jax.random.normal(jax.random.key(i), (k, n), jnp.float32) * 0.02
            return pack(w, spec)

        first = make(0)
        weights = [first] + _rotated(make, first.nbytes, max_copies)[1:]
        fn = jax.jit(
            lambda x, *ps: [
                qmm.quantized_matmul(x, p, interpret=interpret, block_sizes=blocks) for p in ps
            ]
        )
        weight_bytes = first.nbytes
    seconds = _timed(fn, (x, *weights), repeats) / len(weights)
    return seconds, weight_bytes + out_bytes, len(weights)


def _check(k, m, interpret, blocks, rng):
    """Every format against the dequantized dense product (fresh random, non-zero inputs)."""
    for name, spec in FORMATS.items():
        w = jnp.asarray(rng.normal(size=(k, k)) * 0.02, jnp.float32)
        x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        packed = qtensor.pack(w, spec)
        out = qmm.quantized_matmul(x, packed, interpret=interpret, block_sizes=blocks)
        ref = np.asarray(x, np.float64) @ np.asarray(qtensor.unpack(packed), np.float64)
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        if not err < 1e-2:
            raise AssertionError(f"{name} K={k} M={m}: relative error {err:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512, 4096])
    parser.add_argument("--formats", nargs="+", default=["bf16", *FORMATS])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-copies", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()

    interpret = args.smoke or jax.default_backend() != "gpu"
    if args.smoke:
        args.sizes, args.rows, args.repeats, args.max_copies = [256], [1, 80], 2, 1
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth(2**30 if not args.smoke else 2**24, max(3, args.repeats // 4))
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"interpret={interpret}")  # fmt: skip
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")

    rows = []
    for k in args.sizes:
        for m in args.rows:
            blocks = qmm.select_block_sizes(m)
            _check(min(k, 512), m, interpret, blocks, rng)
            base = None
            for name in args.formats:
                seconds, nbytes, copies = bench_case(
                    k, m, name, repeats=args.repeats, interpret=interpret, blocks=blocks,
                    max_copies=args.max_copies, rng=rng,
                )  # fmt: skip
                base = seconds if name == "bf16" else base
                row = {
                    "K=N": k, "M": m, "format": name, "us": seconds * 1e6,
                    "GB/s": nbytes / seconds / 1e9, "of_copy_bw": nbytes / seconds / bandwidth,
                    "speedup_vs_bf16": (base / seconds) if base else None, "copies": copies,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'K=N':>6} {'M':>5} {'format':>6} {'time us':>10} {'GB/s':>8} {'of copy':>8} "
          f"{'vs bf16':>8}")  # fmt: skip
    for r in rows:
        speedup = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else "-"
        print(f"{r['K=N']:>6} {r['M']:>5} {r['format']:>6} {r['us']:>10.1f} {r['GB/s']:>8.1f} "
              f"{r['of_copy_bw']:>8.2f} {speedup:>8}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "copy_bandwidth": bandwidth, "rows": rows}, f)


if __name__ == "__main__":
    main()

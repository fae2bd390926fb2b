"""Deployment on this CPU: llama.cpp TQ2_0 / TQ1_0 / F16 and our packed / float JAX model.

SmolLM2-135M (ternary TWN for the TQ and packed rows), batch 1, greedy, 128 new tokens after a
short prompt. Every measurement runs in its own process, so "peak RSS" is that runtime's alone
(the process's maximum resident set: Python, the runtime, the weights, the KV cache):

    python bench/deploy.py [--new-tokens 128] [--threads 2] [--workdir /tmp/deploy_bench]

Prints a markdown table for docs/benchmarks.md. Tokens/s counts new tokens over the wall time
of prompt + generation, after one warm-up run (JAX's compilation, llama.cpp's first touch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The history of the city of Paris begins"


def _measure_llama_cpp(path: str, new_tokens: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)

    def run():
        llm.reset()
        count = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == new_tokens:
                break

    run()
    start = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - start, "file_bytes": os.path.getsize(path)}


def _measure_ours(kind: str, path: str, new_tokens: int) -> dict:
    import numpy as np

    from tsld_jax import generate
    from tsld_jax.models import gguf, load_model, named
    from tsld_jax.quant import export

    tokenizer = gguf.load_tokenizer(named.smollm2_path())
    prompt = np.asarray([tokenizer(PROMPT)["input_ids"]], np.int32)
    if kind == "ours-packed":
        params, spec = export.load_packed(path)  # the float model is never loaded
        file_bytes = os.path.getsize(path)
    else:
        model = load_model("smollm2-135m", load_tokenizer=False)
        params, spec, file_bytes = model.params, model.spec, 0

    def run():
        generate.generate_tokens(params, spec, prompt, max_new_tokens=new_tokens, eos_ids=())

    run()
    start = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - start, "file_bytes": file_bytes}


def _child(kind: str, path: str, new_tokens: int, threads: int) -> None:
    if kind.startswith("llama.cpp"):
        result = _measure_llama_cpp(path, new_tokens, threads)
    else:
        result = _measure_ours(kind, path, new_tokens)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="/tmp/deploy_bench")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.new_tokens, args.threads)
        return
    os.makedirs(args.workdir, exist_ok=True)
    exports = {
        "llama.cpp F16": ("gguf-f16", "smollm2-f16.gguf", []),
        "llama.cpp TQ2_0": ("gguf-tq2_0", "smollm2-tq2_0.gguf", ["--quant", "twn"]),
        "llama.cpp TQ1_0": ("gguf-tq1_0", "smollm2-tq1_0.gguf", ["--quant", "twn"]),
        "ours-packed": ("packed", "smollm2-twn.packed.safetensors", ["--quant", "twn"]),
    }
    paths = {"ours-float": ""}
    for kind, (fmt, name, flags) in exports.items():
        path = os.path.join(args.workdir, name)
        if not os.path.exists(path):
            print(
                _run(
                    "export.py",
                    "--model",
                    "smollm2-135m",
                    *flags,
                    "--format",
                    fmt,
                    "--output",
                    path,
                )
            )
        paths[kind] = path
    rows = {}
    for kind, path in paths.items():
        out = _run(
            __file__,
            "--child",
            kind,
            path or "-",
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
        )
        rows[kind] = json.loads(out.strip().splitlines()[-1])
        print(kind, rows[kind], flush=True)
    base = rows["llama.cpp F16"]
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} cores, {args.threads} threads, SmolLM2-135M, batch 1, "
        f"{args.new_tokens} new tokens\n"
    )
    print("| runtime | tokens/s | vs llama.cpp F16 | file MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for kind, row in rows.items():
        speed = args.new_tokens / row["seconds"]
        ratio = speed / (args.new_tokens / base["seconds"])
        size = f"{row['file_bytes'] / 1e6:.1f}" if row["file_bytes"] else "-"
        print(
            f"| {kind} | {speed:.1f} | {ratio:.2f}x | {size} | {row['peak_rss_bytes'] / 1e6:.0f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()

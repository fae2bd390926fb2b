"""A ternary student of the paper table, exported to GGUF and run by llama.cpp on PTB validation.

    python experiments/llama_cpp_check.py runs/paper_table/ptb_small/tsld_s0 --name ptb_small

For each format (TQ2_0, TQ1_0 and F32 by default) this exports the run's newest checkpoint
with `export.py`'s writer, feeds llama.cpp (through llama-cpp-python) the same PTB validation
blocks that our model reads, and compares the two on every position: the largest logit
difference relative to the largest logit, top-1 agreement, and each side's perplexity over the
blocks. Writes docs/results/<name>_llama_cpp.json and .md.

The paper table's small model has a word-level tokenizer, which llama.cpp's tokenizer models
cannot express; llama.cpp is fed token ids here, so the file carries a placeholder vocabulary
of the right size (`gguf_export.vocab_from_bytes`). `export.py` itself refuses such a model
for GGUF rather than write a file whose tokenizer would be wrong on text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import paper_table  # noqa: E402

FORMATS = ("gguf-tq2_0", "gguf-tq1_0", "gguf-f32")


def log_softmax(logits_TxV: np.ndarray) -> np.ndarray:
    shifted = logits_TxV - logits_TxV.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def next_token_nll(logits_TxV: np.ndarray, tokens_T: np.ndarray) -> np.ndarray:
    """-log p(token t+1 | tokens <= t) for t < T - 1."""
    logp = log_softmax(logits_TxV[:-1].astype(np.float64))
    return -logp[np.arange(len(tokens_T) - 1), tokens_T[1:]]


def llama_cpp_model(path: str, n_ctx: int):
    import llama_cpp

    # float32 KV cache and no flash attention: llama.cpp's float16 defaults would add their own
    # rounding to the comparison (tests/export_gguf_test.py measures it).
    return llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
        n_threads=os.cpu_count() or 1, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
    )  # fmt: skip


def compare(workdir: str, data_dir: str, blocks: int, formats, out_dir: str) -> dict:
    import jax.numpy as jnp

    from tsld_jax import checkpoint, export_cli
    from tsld_jax.evaluation import perplexity
    from tsld_jax.models import decoder, gguf_export

    run = checkpoint.restore_for_eval(workdir)
    source = export_cli.load_source(argparse.Namespace(checkpoint=workdir, step=None, model=None))
    block_size = run["config"].data.block_size
    tokens_NxT = perplexity.tokenize_blocks(
        perplexity.load_lines("ptb", "validation", data_dir), run["tokenizer"], block_size
    )[:blocks]
    ours = [
        np.asarray(
            decoder.forward(run["params"], jnp.asarray(t)[None], run["spec"],
                            quantizer=run["quantizer"])[0], np.float32)
        for t in tokens_NxT
    ]  # fmt: skip
    our_nll = np.concatenate([next_token_nll(o, t) for o, t in zip(ours, tokens_NxT, strict=True)])
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": paper_table.machine(),
        "workdir": os.path.relpath(workdir, ROOT),
        "step": run["step"],
        "blocks": len(tokens_NxT),
        "block_size": block_size,
        "ours_ppl": float(np.exp(our_nll.mean())),
        "formats": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    for fmt in formats:
        path = os.path.join(out_dir, f"student.{fmt.removeprefix('gguf-')}.gguf")
        report = gguf_export.write_gguf(
            path, source.params, source.spec, fmt=fmt,
            vocab=gguf_export.vocab_from_bytes(source.spec.vocab_size),
            hf_config=source.hf_config, rules=source.rules, name=source.name,
        )  # fmt: skip
        llm = llama_cpp_model(path, block_size)
        theirs, relative, agree, nll = [], [], [], []
        started = time.perf_counter()
        for t, o in zip(tokens_NxT, ours, strict=True):
            llm.reset()
            llm.eval([int(x) for x in t])
            logits = np.array(llm.scores[: len(t)], np.float32)
            theirs.append(logits)
            relative.append(float(np.abs(logits - o).max() / np.abs(o).max()))
            agree.append(float(np.mean(logits.argmax(-1) == o.argmax(-1))))
            nll.append(next_token_nll(logits, t))
        result["formats"][fmt] = {
            "file_mb": os.path.getsize(path) / 1e6,
            "types": report.bytes_by_type(),
            "llama_cpp_ppl": float(np.exp(np.concatenate(nll).mean())),
            "max_relative_logit_diff": max(relative),
            "top1_agreement": float(np.mean(agree)),
            "llama_cpp_s": time.perf_counter() - started,
        }
        print(f"{fmt}: {result['formats'][fmt]}", flush=True)
        del llm
    return result


def markdown(name: str, r: dict) -> str:
    lines = [
        f"# {name}: the ternary student in llama.cpp",
        "",
        f"`{r['workdir']}` at step {r['step']}, exported with export.py's GGUF writer and run by "
        f"llama.cpp (llama-cpp-python) on the first {r['blocks']} PTB validation blocks of "
        f"{r['block_size']} tokens, against our JAX model (fake-quantized ternary weights, float32 "
        f"activations) on the same blocks: our perplexity {r['ours_ppl']:.2f}. "
        "Generated by experiments/llama_cpp_check.py.",
        "",
        "| format | file MB | tensors by type (count) | llama.cpp ppl | ppl ratio "
        "| top-1 agreement | max logit diff / max logit |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, f in r["formats"].items():
        # What the file really holds: a ternary format takes only rows that are a multiple of
        # 256 wide; the writer puts the other ternary linears in Q8_0.
        types = ", ".join(
            f"{name} {count}"
            for name, (count, _) in sorted(f.get("types", {}).items(), key=lambda t: -t[1][1])
        )
        lines.append(
            f"| {fmt} | {f['file_mb']:.2f} | {types} | {f['llama_cpp_ppl']:.2f} | "
            f"{f['llama_cpp_ppl'] / r['ours_ppl']:.4f} | {f['top1_agreement']:.4f} | "
            f"{f['max_relative_logit_diff']:.2e} |"
        )
    m = r["machine"]
    lines += ["", f"Date {r['date']}; machine: {m['cpu']}, {m['cores']} cores."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--name", required=True, help="results file stem, e.g. ptb_small")
    parser.add_argument("--data-dir", default=paper_table.DEFAULT_DATA)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "llama_cpp_check"))
    args = parser.parse_args(argv)
    result = compare(args.workdir, args.data_dir, args.blocks, args.formats.split(","), args.out)
    os.makedirs(paper_table.RESULTS, exist_ok=True)
    stem = os.path.join(paper_table.RESULTS, f"{args.name}_llama_cpp")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(args.name, result))
    print(markdown(args.name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

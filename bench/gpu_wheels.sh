#!/usr/bin/env bash
# Downloads the wheels that the GPU machine's python3 lacks into bench/wheels/ (git-ignored; it
# travels with the working tree, well under its 64 MiB), for bench/gpu_check.sh to install
# offline. That machine has Python 3.12 with jax 0.11.2, flax, optax, orbax, transformers,
# torch, pytest, absl-py, PyYAML, protobuf (../shared/GPU.md, the device KINDS.md); it lacks:
#   ml-collections  configs/ and train.py (required)
#   tensorboardX    train.py's TensorBoard events (optional: metrics.jsonl is always written)
#   gguf            reading GGUF checkpoints (optional: the check uses random weights)
# `datasets` is left out: every data path in the check reads local files or generates tokens.
# All three are pure Python, so one download serves any platform.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d wheels \
  "ml-collections==1.1.0" "tensorboardX==2.6.5" "gguf==0.19.0"
ls -l wheels

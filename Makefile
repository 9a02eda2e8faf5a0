# Quick start:  `make demo`  (set up + run the end-to-end RLHF demo)
#               `make test`  (set up + run the whole test suite; this is what CI runs)
# Suites (README "Development" says what each costs):
#   test-fast        the default suite: unit, parity, CLI, fault tests (-m "not slow and not benchmark")
#   test-portable    the parity tests again with torch and XLA held to other CPU kernels
#   test-slow        end-to-end tests and the mutation run (-m slow)
#   test-benchmarks  tests that rerun a benchmark and check its published figure (not in CI)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKEND ?= jax
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-portable test-slow test-benchmarks bench-quick clean

setup: $(STAMP)

# torch==2.13.0 goes first: its CPU wheel lies on this disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	@# tmux lets one test drive the labelling tool in a real terminal (skipped without it)
	@command -v tmux >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -qq tmux >/dev/null 2>&1) || true
	@# Debian's chromium: the annotation page's real-browser test drives it with Playwright (skipped without it)
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1))) || true
	touch $(STAMP)

demo: setup
	$(BIN)/ppo-rlhf demo --backend $(BACKEND) --out runs/demo-$(BACKEND)

test: test-fast test-portable test-slow

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 -m "not slow and not benchmark"

# tools/kernel_variants.py: intel-avx2 = MKL dispatching as on Intel, capped at AVX2; ATen and
# oneDNN at AVX2; XLA codegen at SSE4.2 -- other kernels than the default on AMD and Intel alike
test-portable: setup
	$(BIN)/python tools/kernel_variants.py --variants intel-avx2 -- -q -n 2 --timeout 1800 -p no:cacheprovider parity_tests

# the slow suite compiles XLA:CPU's code at LLVM's default -O2, as users run it (the others at -O0:
# conftest.py, PPO_RLHF_TEST_XLA_OPT)
test-slow: setup
	PPO_RLHF_TEST_XLA_OPT=default $(BIN)/python -m pytest -q -n 2 --timeout 3600 -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-benchmarks: setup
	PPO_RLHF_TEST_XLA_OPT=default $(BIN)/python -m pytest -q --timeout 7200 -m benchmark

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick --out benchmarks/results/quick.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

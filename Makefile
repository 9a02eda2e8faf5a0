# Quick start:  `make demo`  (set up + run the end-to-end RLHF demo)
#               `make test`  (set up + run the whole test suite; this is what CI runs)
# Suites (README "Development" says what each costs):
#   test-fast        the default suite: unit, parity, CLI, fault tests (-m "not slow and not benchmark")
#   test-portable    the parity tests again with torch and XLA held to other CPU kernels
#   test-slow        end-to-end tests and the mutation run (-m slow)
#   test-benchmarks  tests that rerun a benchmark and check its published figure (not in CI)
#   lint             ruff check (pyflakes, pycodestyle, import order); .ci/run runs it first
#   test-latest      the canary: the parity suite on the newest versions the ranges allow (not in CI)
# Installs: `make setup` installs exactly the versions in requirements.lock; `make lock` refreshes it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
GPU_PLAN := $(VENV)/gpu-plan
# torch is pinned apart from the lock's resolution: its CPU wheel lies on this disk, and an
# unpinned torch pulls a multi-GB CUDA build (pyproject.toml leaves it out on purpose)
TORCH := torch==2.13.0
BACKEND ?= jax
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lock lint demo test test-fast test-portable test-slow test-benchmarks test-latest bench-quick clean

setup: $(STAMP)

# every package at the version requirements.lock names (pip's constraints: what the lock pins is
# installed at that version, nothing else is added); torch first, from the lock too
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip setuptools
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e '.[all]'
	@# ppo-rlhf plan --topology h100: XLA's GPU compiler (jax's CUDA PJRT plugin at jax's version) in
	@# $(GPU_PLAN), where JAX does not load it into every process (ppo_jax.gpu_targets loads it on demand)
	$(BIN)/pip install -q --no-deps --upgrade --target $(GPU_PLAN) "jax-cuda12-pjrt==$$(sed -n 's/^jax==//p' $(LOCK))"
	@# tmux lets one test drive the labelling tool in a real terminal (skipped without it)
	@command -v tmux >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -qq tmux >/dev/null 2>&1) || true
	@# Debian's chromium: the annotation page's real-browser test drives it with Playwright (skipped without it)
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1))) || true
	touch $(STAMP)

demo: setup
	$(BIN)/ppo-rlhf demo --backend $(BACKEND) --out runs/demo-$(BACKEND)

test: test-fast test-portable test-slow

# ruff's pyflakes, pycodestyle and import-order rules ([tool.ruff] in pyproject.toml); .ci/run runs it
lint: setup
	$(BIN)/ruff check .

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --timeout 1800 --durations 30 -m "not slow and not benchmark"

# tools/kernel_variants.py: intel-avx2 = MKL dispatching as on Intel, capped at AVX2; ATen and
# oneDNN at AVX2; XLA codegen at SSE4.2 -- other kernels than the default on AMD and Intel alike
test-portable: setup
	$(BIN)/python tools/kernel_variants.py --variants intel-avx2 -- -q -n 2 --timeout 1800 -p no:cacheprovider parity_tests

# the slow suite compiles XLA:CPU's code at LLVM's default -O2, as users run it (the others at -O0:
# conftest.py, PPO_RLHF_TEST_XLA_OPT)
test-slow: setup
	PPO_RLHF_TEST_XLA_OPT=default $(BIN)/python -m pytest -q -n 2 --timeout 3600 --durations 16 -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-benchmarks: setup
	PPO_RLHF_TEST_XLA_OPT=default $(BIN)/python -m pytest -q --timeout 7200 -m benchmark

# requirements.lock: what `pip install -e '.[all]'` resolves to today, in a fresh venv (after
# $(TORCH)), frozen with pip itself. Commit the result; `make setup` then installs exactly it.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip setuptools
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e '.[all]'
	{ echo "# make lock: pinned versions of everything make setup installs (pip freeze --all of a fresh"; \
	  echo "# venv after $(TORCH) and pip install -e '.[all]'). Refresh with make lock; pyproject.toml keeps"; \
	  echo "# the ranges users install from."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

# The canary: the newest versions pyproject.toml's ranges allow today (torch stays $(TORCH):
# see above), in .venv-latest, then the parity suite. A failure here with `make test` green
# names the release that changed a result before a refreshed lock brings it in.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip setuptools
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[all]'
	.venv-latest/bin/python tools/versions.py
	.venv-latest/bin/python -m pytest -q -n 2 --timeout 1800 -p no:cacheprovider parity_tests

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick --out benchmarks/results/quick.json

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build *.egg-info .pytest_cache .hypothesis

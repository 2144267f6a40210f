# `make train` and `make test` each do all set-up on a fresh machine: they create
# .venv, install torch and trntrain with its test dependencies, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 ships on these machines; elsewhere set e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

# XLA tests run in a second environment with the torch of the Trn1 line: torch 2.9.0
# (on PyPI the CUDA build, ~4 GB; it imports without a GPU) and torch-xla 2.9.0.
# .venv-xla links to a copy outside the checkout, so fresh clones on one machine
# download it once.
XLA_PACKAGES := torch==2.9.0 torch-xla==2.9.0
PYTAG := $(shell $(PYTHON) -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
XLA_VENV_CACHE ?= $(HOME)/.cache/trntrain/venv-xla-$(PYTAG)-torch2.9.0
XLA_BIN := .venv-xla/bin
# PYTHONPATH: the shared environment may hold another checkout's editable install.
XLA_ENV := PYTHONPATH=$(CURDIR) PJRT_DEVICE=CPU TRNTRAIN_REQUIRE_XLA=1

.PHONY: setup setup-xla train test test-cpu test-dist test-xla test-torch29 lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

.venv-xla.stamp: pyproject.toml
	@if ! "$(XLA_VENV_CACHE)/bin/python" -c "import torch_xla" >/dev/null 2>&1; then \
		echo "building $(XLA_VENV_CACHE) (torch 2.9.0 + torch-xla 2.9.0, ~4 GB download)"; \
		rm -rf "$(XLA_VENV_CACHE)" && \
		$(PYTHON) -m venv "$(XLA_VENV_CACHE)" && \
		"$(XLA_VENV_CACHE)/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip && \
		"$(XLA_VENV_CACHE)/bin/python" -m pip install --quiet --no-cache-dir $(XLA_PACKAGES); \
	fi
	ln -sfn "$(XLA_VENV_CACHE)" .venv-xla
	$(XLA_BIN)/python -m pip install --quiet --no-cache-dir -e '.[test]'
	touch $@

setup-xla: .venv-xla.stamp

train: setup
	$(BIN)/trntrain train $(ARGS)

# Everything: lint, the suite on the newest torch, and the XLA tests on torch 2.9 (what
# Trn1 users run; they include gloo ranks: recorded collectives, DCP over the tp mesh).
# pytest's default norecursedirs skips every directory named `dist`, so the gloo layouts
# (tests/dist, about 15 minutes) run only where named: `make test` names the context-
# parallel ones (DIST_IN_TEST), as many as its 40 minutes on 2 cores leave room for;
# `make test-dist` runs them all on the newest torch, `make test-torch29` on torch 2.9
# with the single-process tests that exercise torch across versions.
DIST_IN_TEST := tests/dist/test_context_parallel.py
TORCH29_TESTS := tests/dist $(addsuffix .py,$(addprefix tests/unit/test_,backend \
	document_mask generate lora reliability reference_step))
test: test-cpu test-xla

test-cpu: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests $(DIST_IN_TEST)

test-dist: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/dist

test-xla: setup-xla
	$(XLA_ENV) $(XLA_BIN)/python -m pytest -q -p no:cacheprovider tests/xla

test-torch29: setup-xla
	$(XLA_ENV) $(XLA_BIN)/python -m pytest -q -p no:cacheprovider $(TORCH29_TESTS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python tests/bench/bench_step.py

clean:
	rm -rf $(VENV) .venv-xla .venv-xla.stamp .pytest_cache .ruff_cache

# pflatents — set-up and everyday commands. Both `make demo` and `make test` create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

# torch is pinned to the release on this machine's disk (CPU wheel) before the project installs,
# so pip never resolves a multi-GB CUDA build; a GPU user installs their own torch first.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/pflatents demo

test: venv
	$(BIN)/python -m pytest -q tests

# without the slow tests and the integration tests (real Prefect server, flow runs, CLI subprocess
# pipelines); `make test` runs everything.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not integration" tests

bench: venv
	$(BIN)/python -m benchmarks solvers

clean:
	rm -rf $(VENV) .pytest_cache

# Everything a newcomer needs: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint bench study

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the local CPU build: the package's own `torch>=2.4` is then already
# satisfied and pip never pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# ruff for the code, lint-imports for the architecture (the contracts in pyproject.toml).
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collects nothing: that is a failure here too.
test: install lint
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/childtune compare --task mr --methods full,child-f,child-d --seeds 1 \
		--train-size 1000 --output runs/demo --overwrite

bench: install
	$(PY) benchmarks/bench.py --output benchmarks/RESULTS.md

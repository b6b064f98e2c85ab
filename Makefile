# Two entry points: `make demo` and `make test`. Both create the virtual
# environment on first use, installing the pinned stack from constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist; whole files per process, so module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/segpipe demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check segpipe flows tests benchmarks deploy
	$(BIN)/mypy segpipe flows
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check segpipe flows tests benchmarks deploy
	$(BIN)/mypy segpipe flows

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .mypy_cache

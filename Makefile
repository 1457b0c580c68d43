# podkit developer commands. `make demo` and `make test` work from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/podkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/podkit

venv: $(BIN)/podkit

## run the quickstart system on embedded backends (Ctrl-C stops it)
demo: venv
	$(BIN)/podkit up examples/quickstart.yaml

## lint, type-check and run the whole test suite against real servers
test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .podkit

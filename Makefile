# podkit developer commands. `make demo` and `make test` work from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-unit lint venv clean wheel

$(BIN)/podkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/podkit

venv: $(BIN)/podkit

## run the quickstart system on embedded backends (Ctrl-C stops it)
demo: venv
	$(BIN)/podkit up examples/quickstart.yaml

## install the servers the tests need when missing, lint, type-check, run the whole suite
## (a missing server fails the tests that need it, never skips them)
test: venv
	tools/setup-servers
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	$(BIN)/lint-imports
	PODKIT_REQUIRE_SERVERS=1 $(BIN)/pytest -q -n 3

## the tests that need no server to install: the others are skipped and counted
test-unit: venv
	$(BIN)/pytest -q -n 3

## a platform wheel with the request path compiled by mypyc, from a fresh build venv, in dist/
wheel:
	rm -rf .build-venv dist
	$(PY) -m venv .build-venv
	.build-venv/bin/pip install -q --upgrade pip 'setuptools>=77' wheel 'mypy==2.4.1' types-PyYAML
	.build-venv/bin/pip install -q '.[all]'
	PODKIT_COMPILE=1 .build-venv/bin/pip wheel -q --no-deps --no-build-isolation --wheel-dir dist .
	$(PY) tools/check_wheel.py dist/podkit-*.whl

clean:
	rm -rf $(VENV) .podkit .build-venv dist build

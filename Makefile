# Set-up and the everyday commands: `make up` runs HydraServe on this machine, `make test`
# runs the tests, `make demo` runs the engine alone on the demo model. Each installs what it
# needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up demo test lint bench-engine clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/hydraserve up

demo: $(STAMP)
	$(BIN)/hydraserve demo-model .hydraserve/demo-model
	$(BIN)/hydraserve generate .hydraserve/demo-model "Once upon a time" --max-tokens 48

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-engine: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

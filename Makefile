# Thin wrappers over commands you could type. `make serve` and `make test` set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000

.PHONY: setup serve test lint bench weights clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with dev extras

serve: setup  ## serve the bundled weights on port $(PORT)
	$(BIN)/snnet serve --host 0.0.0.0 --port $(PORT)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check snnet_core server tests bench
	$(BIN)/ruff format --check snnet_core server tests bench

weights: setup  ## retrain the bundled SN-Net from scratch into weights/ (about 25 minutes on 2 cores)
	$(BIN)/python weights/recipe.py

bench: setup  ## snnet_core benchmarks (printed, not asserted)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/switching.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

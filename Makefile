# Thin wrappers over commands you could type. `make serve` and `make test` set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make serve PORT=8001`, or SNNET_PORT=8001 (the --port below would override it otherwise); a
# second server beside one on the defaults also needs another gRPC port: SNNET_GRPC_PORT=8082
# (0: no gRPC)
PORT   ?= $(or $(SNNET_PORT),8000)

.PHONY: setup serve test lint bench weights clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with dev extras

serve: setup  ## serve the bundled weights on port $(PORT)
	$(BIN)/snnet serve --host 0.0.0.0 --port $(PORT)

# The tests that assert what a live server decides from its own timings (marked `timing`) run
# alone; the rest run in TEST_WORKERS processes, a test file to each (its servers start once).
TEST_WORKERS ?= 2

# Both runs' servers share one profile cache: the first server measures, the others calibrate.
test: setup  ## the whole test suite: all but the `timing` tests in parallel, then those alone
	cache=$$(mktemp -d) && export SNNET_TEST_PROFILE_CACHE=$$cache/profiles.json; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not timing"; rest=$$?; \
	$(BIN)/python -m pytest -m timing; timing=$$?; \
	rm -rf "$$cache"; [ $$rest -eq 0 ] && [ $$timing -eq 0 ]

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

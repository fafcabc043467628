# mone-train: the two commands the README starts with, and a few helpers.
#   make train   set up .venv (once), build the default corpus (once), train the default model
#   make test    set up .venv (once), run the whole test suite (what CI runs, after make lint)
#   make test-fast   the unit tests only (no training runs, no subprocesses; docs/testing.md)
#   make test-gpu    the GPU tier only (tests/test_gpu.py; skipped without a CUDA device)
VENV ?= .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
# Extra Hydra overrides for `make train`, e.g. make train ARGS="moe=moe trainer.steps=100"
ARGS ?=
# pytest workers (pytest-xdist, a test file per worker at a time); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install train test test-fast test-gpu lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

train: install
	$(VENV)/bin/mone-train $(ARGS)

test: install
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/trainer_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

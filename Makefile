# The two commands a new user needs (see README.md): `make demo` and `make test`.
# Both create .venv on first use; nothing else needs to be installed but Python >= 3.10
# (and redis-server for the tests: https://redis.io/docs/latest/operate/oss_and_stack/install/).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m victor_rcache.demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_tiers.py $(ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

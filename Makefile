# netfilter: the two Quick start targets, plus their pieces.
# Works on a fresh Debian/Ubuntu machine with Python >= 3.11 and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean sysdeps

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing python3-venv (needs root)"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard src/netfilter/*.c src/netfilter/*/*.c)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

## demo: set up, then run the embedded demo in the foreground until Ctrl-C: the bundled
## demo list, DNS on 127.0.0.1:5353, proxy :8080, stop page :8081, metrics :9108, state
## in var/; it prints what to try
demo: $(STAMP)
	$(BIN)/netfilter serve

## test: set up (Python packages, and Debian packages as root), lint, type-check, test
test: $(STAMP) sysdeps lint typecheck unit

sysdeps:
	@scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks addons

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP) sysdeps
	$(BIN)/python -m pytest benchmarks -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks

# glide_lightning: set up, test and benchmark. Run `make help` for the list.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BENCH_OUT ?= bench/results.json

.PHONY: help setup test test-all bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install the package, its dependencies and the dev tools

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup  ## run the test suite (offline, CPU; GPU-only tests are skipped)
	$(PY) -m pytest -q

bench: setup  ## time forward, backward and guided sampling; writes $(BENCH_OUT)
	$(PY) -m glide_lightning.bench --out $(BENCH_OUT)

clean:  ## remove caches (keeps .venv)
	rm -rf .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

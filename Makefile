# One command each: install, run, test, check, bench. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/js/node_modules/.installed

.PHONY: install run test check bench clean

install: $(STAMP)

$(STAMP): setup.py setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev,redis]'
	touch $(STAMP)

# The guide's JavaScript client runs under Node with the `ws` package; without npm that test skips.
$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/js --no-audit --no-fund --silent && touch $(NODE_STAMP); \
	else echo "npm not found: the Node client test will skip"; fi

run: install
	$(BIN)/diary-ws serve

test: install $(NODE_STAMP)
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check diary_ws tests bench
	$(BIN)/ruff format --check diary_ws tests bench
	$(BIN)/mypy

# The benchmark has its own environment: the load generator (picows, uvloop) and the baseline (FastAPI)
# never enter the service's. The servers under test run from $(VENV), as `make run` runs them.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): setup.py setup.cfg constraints.txt bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test,redis]' -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) tests/js/node_modules .pytest_cache .mypy_cache .ruff_cache *.egg-info

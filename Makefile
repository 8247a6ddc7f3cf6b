# One command each: install, run, test, check, bench. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEV_STAMP := $(VENV)/.installed-dev
NODE_STAMP := tests/js/node_modules/.installed

.PHONY: install run test check bench clean

# Each target installs what it needs and no more. `run`: the service with its Redis client, as a regular
# install (it is rebuilt when a source file changes; setuptools' editable installs of this flat layout
# print a warning on every build). `test` adds the test tools and `check` the linters, both into the same
# .venv as an editable install, so the tests' own subprocesses run the sources as they are.
SOURCES := $(shell find diary_ws -type f -not -name '*.pyc' -not -path '*/__pycache__/*')

install: $(STAMP)

# (`rm -rf build`: a stale build/lib would ship files deleted since.)
$(STAMP): setup.py setup.cfg constraints.txt $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	rm -rf build
	$(BIN)/python -m pip install --quiet -c constraints.txt '.[redis]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[redis,test]'
	touch $(TEST_STAMP)

$(DEV_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[redis,test,dev]'
	touch $(DEV_STAMP)

# The guide's JavaScript client runs under Node with the `ws` package; without npm that test skips.
$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/js --no-audit --no-fund --silent && touch $(NODE_STAMP); \
	else echo "npm not found: the Node client test will skip"; fi

run: install
	$(BIN)/diary-ws serve

test: $(TEST_STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest

check: $(DEV_STAMP)
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

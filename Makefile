# kvrouter: the commands the README and CI use. `make help` lists them.
PYTHON ?= python3
PIP_FLAGS ?= -q

.PHONY: help install deps test lint typecheck pytest bench-index bench-router

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps:  ## system packages the tests need: redis-server, redis-cli and redis-sentinel (Debian)
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v redis-sentinel >/dev/null; then \
		echo "installing redis-server, redis-tools and redis-sentinel from Debian's packages"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server redis-tools redis-sentinel >/dev/null; \
	fi

install: deps  ## the project with its test extras, editable
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[test]'

lint:  ## ruff: lint and formatting
	$(PYTHON) -m ruff check kvrouter tests
	$(PYTHON) -m ruff format --check kvrouter tests

typecheck:  ## mypy --strict on the package
	$(PYTHON) -m mypy kvrouter

pytest:  ## the test suite alone (real Redis, standalone and a 3-master Cluster)
	$(PYTHON) -m pytest -q

test: install lint typecheck pytest  ## everything CI runs: install, lint, types, tests

bench-index: install  ## the index benchmark, quick mode
	$(PYTHON) -m kvrouter bench index --quick

bench-router: install  ## the router benchmark, quick mode: added latency, throughput, tokenizer cache
	$(PYTHON) -m kvrouter bench router --quick

# kvrouter: the commands the README and CI use. `make help` lists them.
#
# Every Python command runs in the project's own virtual environment (.venv), built by uv from
# the committed lock (uv.lock) with every optional extra, so a machine's own site-packages can
# never stand in for a missing dependency. uv itself is pinned and installed from PyPI into
# ~/.cache/kvrouter on first use (set UV=... to use another).
UV_VERSION ?= 0.13.8
UV_HOME ?= $(HOME)/.cache/kvrouter/uv-$(UV_VERSION)
UV ?= $(UV_HOME)/bin/uv
VENV ?= .venv
PY = $(VENV)/bin/python
# uv uses the machine's python3 (3.11+) and never downloads an interpreter of its own.
export UV_PYTHON_DOWNLOADS = never
export UV_PROJECT_ENVIRONMENT = $(VENV)
# Tools the tests run by name (hadolint, kvrouter) come from the venv first.
RUN = PATH="$(abspath $(VENV))/bin:$(dir $(UV)):$$PATH" PYTHONNOUSERSITE=1
# The shipped Python packages: the core and tools, and the two processes.
PACKAGES = kvrouter router_node eviction_listener
LATEST_VENV ?= $(HOME)/.cache/kvrouter/venv-latest

.PHONY: settings-doc protos help install deps uv lock helm test test-latest reliability lint typecheck pytest demo bench-index bench-routing bench-listener bench-router

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps:  ## system packages the tests need: redis-server, redis-cli, redis-sentinel, openssl (Debian)
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v redis-sentinel >/dev/null || ! command -v openssl >/dev/null; then \
		echo "installing redis-server, redis-tools, redis-sentinel and openssl from Debian's packages"; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server redis-tools redis-sentinel openssl >/dev/null; \
	fi

# helm for the chart tests, built from the Go module proxy (no other download is possible
# here) into a cache that later runs find. About 3 minutes cold on 2 cores, 0 s when cached.
HELM_VERSION ?= v3.19.0
# helm v3.19 is built against Kubernetes 1.34 (client-go v0.34): its default for .Capabilities
HELM_K8S_MINOR ?= 34
HELM_BIN_DIR ?= $(HOME)/.cache/kvrouter/bin
HELM_PKG := helm.sh/helm/v3
HELM_LDFLAGS := -s -w -X $(HELM_PKG)/internal/version.version=$(HELM_VERSION) \
	-X $(HELM_PKG)/pkg/chartutil.k8sVersionMajor=1 -X $(HELM_PKG)/pkg/chartutil.k8sVersionMinor=$(HELM_K8S_MINOR) \
	-X $(HELM_PKG)/pkg/lint/rules.k8sVersionMajor=1 -X $(HELM_PKG)/pkg/lint/rules.k8sVersionMinor=$(HELM_K8S_MINOR)

helm:  ## helm (pinned) into ~/.cache/kvrouter/bin with `go install`, when Go is present
	@if [ -x "$(HELM_BIN_DIR)/helm" ] && "$(HELM_BIN_DIR)/helm" version --short 2>/dev/null | grep -q "^$(HELM_VERSION)"; then \
		echo "helm $(HELM_VERSION) cached in $(HELM_BIN_DIR)"; \
	elif ! command -v go >/dev/null; then \
		echo "no Go toolchain: chart tests will skip (install Go, or put helm on PATH)"; \
	else \
		echo "building helm $(HELM_VERSION) with go install (a few minutes, once)"; \
		tmp=$$(mktemp -d); t0=$$(date +%s); \
		GOBIN="$(HELM_BIN_DIR)" GOMODCACHE="$$tmp/mod" GOCACHE="$$tmp/cache" GOFLAGS=-modcacherw CGO_ENABLED=0 \
			go install -trimpath -ldflags '$(HELM_LDFLAGS)' $(HELM_PKG)/cmd/helm@$(HELM_VERSION) \
			|| { rm -rf "$$tmp"; exit 1; }; \
		rm -rf "$$tmp"; echo "helm built in $$(( $$(date +%s) - t0 )) s: $$("$(HELM_BIN_DIR)/helm" version --short)"; \
	fi

uv:  ## uv $(UV_VERSION) into ~/.cache/kvrouter (from PyPI, into a venv of its own)
	@if ! "$(UV)" --version 2>/dev/null | grep -q "^uv $(UV_VERSION)"; then \
		echo "installing uv $(UV_VERSION) into $(UV_HOME)"; \
		python3 -m venv "$(UV_HOME)" && "$(UV_HOME)/bin/pip" install -q --disable-pip-version-check "uv==$(UV_VERSION)"; \
	fi

lock: uv  ## refresh uv.lock after a change to pyproject.toml's dependencies (commit it)
	"$(UV)" lock

install: deps uv  ## the project and every extra into .venv, exactly as uv.lock pins them
	@out=$$("$(UV)" lock --check 2>&1) || { echo "$$out" >&2; \
		echo "uv.lock does not match pyproject.toml: run 'make lock' (uv lock) and commit uv.lock" >&2; exit 1; }
	"$(UV)" sync --locked --all-extras

lint:  ## ruff (lint and formatting) and the import layers (import-linter)
	$(RUN) $(PY) -m ruff check $(PACKAGES) tests
	$(RUN) $(PY) -m ruff format --check $(PACKAGES) tests
	$(RUN) lint-imports

typecheck:  ## mypy --strict on the package
	$(RUN) $(PY) -m mypy $(PACKAGES)

pytest:  ## the test suite alone (real Redis, standalone and a 3-master Cluster)
	$(RUN) $(PY) -m pytest -q

test: install lint typecheck pytest  ## everything CI runs: install, lint, types, tests

# Dependency drift, on purpose: the newest versions the declared ranges allow, in a throwaway
# venv, through the same checks. Not part of CI; run it before bumping the lock (`make lock`).
test-latest: deps uv  ## lint, types and tests on the newest versions pyproject.toml allows (not the lock)
	rm -rf "$(LATEST_VENV)"
	"$(UV)" venv -q "$(LATEST_VENV)"
	VIRTUAL_ENV="$(LATEST_VENV)" "$(UV)" pip install -q --upgrade --resolution highest -e '.[test,bench,yaml,demo]'
	VIRTUAL_ENV="$(LATEST_VENV)" "$(UV)" pip list 2>/dev/null | grep -iE '^(redis|aiohttp|tokenizers|pyzmq|mypy|ruff) ' || true
	$(MAKE) --no-print-directory lint typecheck pytest VENV="$(LATEST_VENV)"

reliability: install  ## faults, hostile input, security and a 2-minute soak; rewrites docs/reliability.md
	KVR_SOAK_S=120 $(RUN) $(PY) -m pytest tests/faults -m "faults or soak" -q --reliability-report docs/reliability.md

demo: install  ## the demo: Redis, 8 simulated vLLM workers, listener and router on loopback
	$(RUN) $(PY) -m kvrouter demo

bench-index: install  ## the index benchmark, quick mode
	$(RUN) $(PY) -m kvrouter bench index --quick

bench-routing: install  ## every routing policy on the Mooncake trace, quick mode
	$(RUN) $(PY) -m kvrouter bench routing --quick

bench-listener: install  ## the listener benchmark, quick mode
	$(RUN) $(PY) -m kvrouter bench listener --quick

bench-router: install  ## the router benchmark, quick mode: added latency, throughput, tokenizer cache
	$(RUN) $(PY) -m kvrouter bench router --quick

settings-doc:  ## regenerate docs/settings.md from the settings schema
	$(RUN) $(PY) -m kvrouter.settings_doc > docs/settings.md

protos:  ## regenerate router_node/extproc's ext_proc modules from ext_proc.proto (grpcio-tools)
	$(RUN) $(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		router_node/extproc/ext_proc.proto

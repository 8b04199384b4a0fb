# kvrouter: the commands the README and CI use. `make help` lists them.
PYTHON ?= python3
PIP_FLAGS ?= -q

.PHONY: help install deps helm test reliability lint typecheck pytest demo bench-index bench-routing bench-listener bench-router

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

reliability: install  ## faults, hostile input, security and a 2-minute soak; rewrites docs/reliability.md
	KVR_SOAK_S=120 $(PYTHON) -m pytest tests/faults -m "faults or soak" -q --reliability-report docs/reliability.md

demo: install  ## the demo: Redis, 8 simulated vLLM workers, listener and router on loopback
	$(PYTHON) -m kvrouter demo

bench-index: install  ## the index benchmark, quick mode
	$(PYTHON) -m kvrouter bench index --quick

bench-routing: install  ## every routing policy on the Mooncake trace, quick mode
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[bench]'
	$(PYTHON) -m kvrouter bench routing --quick

bench-listener: install  ## the listener benchmark, quick mode
	$(PYTHON) -m kvrouter bench listener --quick

bench-router: install  ## the router benchmark, quick mode: added latency, throughput, tokenizer cache
	$(PYTHON) -m kvrouter bench router --quick

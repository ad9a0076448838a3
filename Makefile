# cryopod task runner. `make help` lists the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
HELM = $(shell hack/ensure-helm.sh)
CRD_DIR := charts/cryopod/crds

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: demo
demo: ## Run the demo on a fresh machine: local cluster, cryopod with Helm, a live migration (leaves the cluster up)
	e2e/demo.sh

.PHONY: test
test: lint unit e2e ## Run every test tier (what CI runs)

.PHONY: unit
unit: ## Tests without the cluster: unit, schema (CRD freshness, examples), the chart as helm renders it and its alerts through promtool, host integration (root, real cgroups)
	hack/ensure-host-packages.sh
	@# Layers (docs/development.md): the operator and the plugin reach the agent only
	@# through its gRPC contract, cryopod-agent-api.
	for crate in cryopod-operator kubectl-cryopod; do \
	  if $(CARGO) tree --locked -p "$$crate" -e normal,build --prefix none | grep -q '^cryopod-node-agent '; then \
	    echo "$$crate links cryopod-node-agent: talk to the agent through cryopod-agent-api" >&2; exit 1; \
	  fi; \
	done
	$(CARGO) test --workspace --locked --exclude cryopod-e2e
	@# A statement of its own: under set -e a failed promtool build stops here (as an
	@# assignment prefixed to the cargo command it would not).
	promtool=$$(hack/ensure-promtool.sh); \
	  CRYOPOD_HELM=$(HELM) CRYOPOD_PROMTOOL="$$promtool" $(CARGO) test --locked -p cryopod-e2e --lib --bins

.PHONY: e2e
e2e: ## End-to-end tests: cluster-up, the tests, cluster-down, then a check that nothing is left
	e2e/run.sh

.PHONY: lint
lint: ## cargo fmt --check, cargo clippy -D warnings, helm lint
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(HELM) lint --strict charts/cryopod
	$(HELM) lint --strict charts/cryopod --set agent.installHandler=true --set metrics.serviceMonitor.enabled=true --set metrics.dashboard.enabled=true --set metrics.prometheusRule.enabled=true

PREFIX ?= $(HOME)/.local

.PHONY: plugin
plugin: ## Build the kubectl plugin and install it as $(PREFIX)/bin/kubectl-cryopod (kubectl finds it on PATH)
	$(CARGO) build --locked --release -p kubectl-cryopod
	install -D -m 0755 "$${CARGO_TARGET_DIR:-target}/release/kubectl-cryopod" "$(PREFIX)/bin/kubectl-cryopod"

.PHONY: crds
crds: ## Regenerate the CRD YAML from the Rust types
	$(CARGO) run --quiet --locked -p cryopod-crds --bin crdgen -- $(CRD_DIR) docs/api.md

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: bench
bench: ## Benchmarks against baselines run side by side on the local cluster; writes docs/performance.md and .png
	bench/run.sh

.PHONY: cluster-up
cluster-up: ## Start the real local cluster (2 nodes, containerd, CRIU, S3); prints its KUBECONFIG
	e2e/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and remove everything it created (logs stay)
	e2e/cluster/down.sh

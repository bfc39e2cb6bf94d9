# pgwarden developer commands. `make test` is what CI runs (see .ci/run and README).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PGWARDEN_CACHE ?= /var/tmp/pgwarden-cache
export PGWARDEN_CACHE

.PHONY: help venv test lint typecheck unit pytest devcluster devcluster-down demo lock bench clean assets crd chart-files \
	cluster cluster-down cluster-status image cluster-test

$(BIN)/pgwarden: pyproject.toml constraints.txt
	@echo ">>> creating $(VENV) and installing pgwarden with test tools"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

venv: $(BIN)/pgwarden ## create .venv and install pgwarden with the test tools

# PostgreSQL binaries and the control plane are fetched/built once and cached outside the checkout.
assets: venv ## fetch/build PostgreSQL, control-plane, helm and Prometheus binaries once (cached in the PGWARDEN_CACHE directory)
	@echo ">>> Debian packages the tests need (hack/test-deps.sh: only the missing ones)"
	bash hack/test-deps.sh
	@echo ">>> PostgreSQL binaries (every major the tiers run on: $${PGWARDEN_PG_VERSIONS:-14 15 16 17 18})"
	$(BIN)/python -m tests.harness.pgbinaries
	@echo ">>> control plane binaries (etcd, kube-apiserver, kubectl)"
	$(BIN)/python -m tests.harness.controlplane_assets
	@echo ">>> helm (hack/helm-build.sh: built from its Go module once)"
	$(BIN)/python -m tests.harness.helm_assets
	@echo ">>> prometheus and promtool (the alert rules and the dashboard are tested with them)"
	$(BIN)/python -m tests.harness.prometheus

# The CRD is generated from the model (operator/pgwarden/policy/model.py is its one source); run this after
# changing the model. tests/unit/test_crd.py fails while the committed file is stale.
# PYTHONPATH: generate from this checkout's model even when the venv was installed from another checkout.
crd: venv ## regenerate manifests/crd/ (and the Helm chart's copy) from the pydantic model (its one source)
	PYTHONPATH=$(CURDIR)/operator $(BIN)/python -m pgwarden.policy.crd manifests/crd/pgwarden.dev_postgrespolicies.yaml
	$(MAKE) --no-print-directory chart-files

# The Helm chart carries copies of the CRD files (Helm installs crds/ from inside the chart; it loads symlinks
# but warns about each on every command). tests/unit/test_helm_files.py fails while a copy differs.
CHART_CRDS := manifests/helm/pgwarden/crds
chart-files: ## copy the files the Helm chart shares with manifests/ into it
	cp manifests/crd/pgwarden.dev_postgrespolicies.yaml manifests/peering/clusterkopfpeerings.kopf.dev.yaml $(CHART_CRDS)/
	cp manifests/monitoring/prometheusrule.yaml manifests/helm/pgwarden/files/

lint: venv ## ruff, hadolint and the import-linter layer contracts
	@echo ">>> ruff"
	$(BIN)/ruff check operator tests bench hack
	$(BIN)/ruff format --check operator tests bench hack
	@echo ">>> hadolint Dockerfile (settings and the reason for any ignored rule: .hadolint.yaml)"
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile
	@echo ">>> import layering"
	$(BIN)/lint-imports

typecheck: venv ## mypy --strict over operator/, tests/, bench/ and hack/
	@echo ">>> mypy --strict"
	$(BIN)/mypy

unit: venv ## the unit tests only: no PostgreSQL, no control plane, nothing to build (seconds)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# On a cold machine the Go builds (control plane, helm, prometheus, the node's components) and the images run
# in the background, niced, while the tiers that need none of them run first (tests/conftest.py orders them:
# the real node last); a test that needs a tool still being built waits for that build (the scripts take a
# lock). Warm, the Go builds are no-ops and the images are rebuilt from cached layers (this checkout's code).
pytest: venv ## the whole test suite (fetches and builds what it needs first); PYTEST_ARGS passes options
	@echo ">>> Debian packages the tests need (hack/test-deps.sh: only the missing ones)"
	bash hack/test-deps.sh
	@echo ">>> PostgreSQL binaries (every major the tiers run on: $${PGWARDEN_PG_VERSIONS:-14 15 16 17 18})"
	$(BIN)/python -m tests.harness.pgbinaries
	@echo ">>> control plane, helm, prometheus, node, images: built in the background (log: .assets-build.log)"
	nohup nice -n 19 bash -c '$(BIN)/python -m tests.harness.controlplane_assets && \
	  $(BIN)/python -m tests.harness.helm_assets && $(BIN)/python -m tests.harness.prometheus && \
	  bash hack/cluster-deps.sh && bash hack/cluster-build.sh && \
	  bash hack/image-build.sh pause postgres postgres18 pgwarden' \
	  > .assets-build.log 2>&1 < /dev/null &
	@echo ">>> pytest"
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest ## what CI runs: lint, typecheck, pytest

# The whole thing on this machine, no cluster needed: control plane, PostgreSQL, manifests, operator,
# sessions being reaped. Ends by itself (about a minute once the assets are built); see hack/demo.py.
demo: assets ## the whole thing on this machine: control plane, PostgreSQL, operator reaping sessions
	PYTHONPATH=$(CURDIR) $(BIN)/python hack/demo.py

devcluster: assets ## start a local control plane + PostgreSQL to try pgwarden by hand
	$(BIN)/python -m tests.harness.devcluster up

devcluster-down: venv ## stop the devcluster
	$(BIN)/python -m tests.harness.devcluster down

lock: ## regenerate constraints.txt (exact pins)
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install --quiet '.[test]'
	{ echo "# Exact pins for reproducible installs (make, Dockerfile, CI). Regenerate with: make lock"; \
	  .lockvenv/bin/pip freeze --exclude-editable | grep -v '^pgwarden'; } > constraints.txt
	rm -rf .lockvenv

# A real single-node Kubernetes on this machine (root; Debian packages, Go builds and images are installed
# and cached on first use): etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet,
# kube-proxy. Admin kubeconfig: .cluster/kubeconfig, kubectl: .cluster/bin/kubectl. See
# tests/harness/cluster.py. cluster-down stops it all and fails if anything is left on the host.
cluster: venv
	$(BIN)/python -m tests.harness.cluster up

cluster-down: venv
	$(BIN)/python -m tests.harness.cluster down

cluster-status: venv
	$(BIN)/python -m tests.harness.cluster status

# The project's Dockerfile built without a daemon (buildah) as localhost/pgwarden:dev, plus the
# PostgreSQL test images localhost/postgres:15 and :18; loaded into the cluster's containerd when it runs, else at
# the next `make cluster`. Base images come from debootstrap (hack/image-build.sh).
image:
	bash hack/cluster-deps.sh
	bash hack/image-build.sh pgwarden postgres postgres18

# Tests on the real node (tests/cluster): reuse a running `make cluster`, else start and stop their own.
cluster-test: venv image
	$(BIN)/pytest tests/cluster $(PYTEST_ARGS)

# Benchmarks print numbers; they are not part of the test suite (see README, Benchmarks).
bench: assets ## run every benchmark (prints numbers; not part of the suite)
	$(BIN)/python bench/engine_cycle.py
	$(BIN)/python bench/threshold_lag.py
	$(BIN)/python bench/operator_cycle.py

help: ## list the targets
	@awk -F':.*## ' '/^[a-z-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

clean: ## remove .venv and the caches
	rm -rf $(VENV) .devcluster .cluster .pytest_cache .mypy_cache .ruff_cache

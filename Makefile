# Fermata — the two entry points on a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := api/fermata_api operator/fermata_operator trainer/fermata_trainer

.PHONY: all venv demo test test-fast lint typecheck crds crds-check cluster-bin s3-bin helm-bin promtool images images-clean local-up local-down clean

all: test

# Python environment: the operator, the trainer (torch + audiocraft), the dev tools and the
# development harness (dev/: test control plane, test kubelet, local mode, demo, synthetic data),
# installed editable here and never in an image.
# audiocraft 1.3.0 pins torch 2.1, so it and xformers are installed with --no-deps on top of
# their real runtime dependencies (pyproject's `trainer` extra).
$(STAMP): pyproject.toml dev/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[trainer,dev]'
	$(BIN)/pip install -q --no-deps audiocraft==1.3.0 xformers==0.0.35
	$(BIN)/pip install -q --no-deps -e dev
	touch $@

venv: $(STAMP)

# kube-apiserver (+ embedded etcd), controller-manager, scheduler and kubectl, built from the
# Go module proxy (k8s.io/kubernetes v1.35.4). Cold: ~7 min on 2 cores; then seconds.
cluster-bin:
	bash tests/cluster/build.sh

# versitygw, a real S3-compatible server, for the storage tests.
s3-bin:
	bash tests/s3server/build.sh

# Helm v3 (tools/helm/go.mod: helm.sh/helm/v3 v3.22.0) for the chart tests. Cold ~3 min; then instant.
helm-bin:
	bash tools/helm/build.sh

# The operator and trainer images from the Dockerfile, built with buildah (chroot isolation, vfs
# storage; buildah and debootstrap come from Debian) on a debootstrap bookworm base, tagged as the
# chart and the examples name them. Rebuilt only when their inputs change. Cold: see BENCHMARKS.md.
images:
	bash tools/images/build.sh

# Removes them (and their working containers: about 14 GB with vfs) from buildah's storage.
images-clean:
	bash tools/images/build.sh --clean

# promtool, from Debian's prometheus package, for the alert-rule tests.
promtool:
	command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

crds: venv
	$(BIN)/python -m fermata_operator.crdgen

crds-check: venv
	$(BIN)/python -m fermata_operator.crdgen --check

lint: venv
	$(BIN)/ruff check api operator trainer kubectl dev tests benchmarks
	$(BIN)/ruff format --check api operator trainer kubectl dev tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: venv
	$(BIN)/mypy -p fermata_api -p fermata_operator -p fermata_trainer -p fermata_kubectl -p fermata_dev

# Everything CI runs: lint, types, CRD drift, and the whole test suite (unit, trainer on CPU,
# operator against the real API server, S3 against a real server).
test: venv cluster-bin s3-bin helm-bin promtool images crds-check lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Only the tests that need neither Go binary.
test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/operator tests/trainer -m "not cluster"

# Local mode end to end: control plane + fake GPU nodes + operator + the real (tiny) trainer.
demo: venv cluster-bin
	$(BIN)/python -m fermata_dev.demo

local-up: venv cluster-bin
	$(BIN)/fermata local up

local-down: venv
	$(BIN)/fermata local down

clean:
	rm -rf $(VENV) tests/cluster/bin tests/s3server/bin tools/helm/bin .fermata *.egg-info

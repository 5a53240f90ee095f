# Developer and CI entry points. Recipes stay short; the logic lives in scripts/.
PYTHON ?= python3
PY := .venv/bin/python
PYMILVUS_VERSIONS := 0.2.12 0.2.14
WHEELS := $(foreach v,$(PYMILVUS_VERSIONS),.venv/wheels/$(v)/pymilvus-$(v)-py3-none-any.whl)
PYTEST_ARGS ?=

.PHONY: venv test run proto coverage bench chaos attacks

venv: .venv/.stamp $(WHEELS)

# Rebuilt when a requirements file, a build file or the merge kernel's C source is newer than the
# stamp. The package itself is installed editable (console scripts `mishards`, `milvus-node`; no sys.path edits anywhere).
REQUIREMENTS := requirements.txt requirements-base.txt requirements-proxy.txt requirements-node.txt requirements-dev.txt
.venv/.stamp: $(REQUIREMENTS) pyproject.toml setup.py mishards/core/_topk.c
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Mishards needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1). Try: make venv PYTHON=python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The reference wheels for conformance tests and the real-client harness; one version per download.
$(WHEELS): | .venv/.stamp
	$(PY) -m pip download -q --no-deps -d $(@D) pymilvus==$(notdir $(@D))

test: venv
	PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test.sh

run: venv
	$(PY) -m scripts.local_cluster

proto:
	scripts/gen_proto.sh

coverage: venv
	PYTEST_ARGS="--cov=milvus_node --cov=mishards --cov=utils --cov-report=term-missing $(PYTEST_ARGS)" scripts/test.sh

# Benchmarks print tables; BENCH_ARGS passes options to the search benchmark (e.g. --rows 20000).
bench: venv
	$(PY) -m bench.merge_bench
	$(PY) -m bench.search_bench $(BENCH_ARGS)
	$(PY) -m bench.workers_bench
	$(PY) -m bench.node_bench

# Searches checked against an oracle while nodes are paused, killed, slowed and restarted (~3 min).
chaos: venv
	$(PY) -m bench.chaos_bench $(CHAOS_ARGS)

# The attack battery (README "Attack battery"): ATTACK_ARGS passes options (e.g. --seconds 5 --only gzip_bomb).
attacks: venv
	$(PY) -m bench.attacks $(ATTACK_ARGS)

# ---- Deployment (README: "Running with Docker", "Running on Kubernetes"). The shell logic lives in
# scripts/ and kubernetes_demo/start.sh; DOCKER, COMPOSE and KUBECTL name the tools.
DOCKER ?= docker
COMPOSE ?= docker-compose
KUBECTL ?= kubectl
# Image names: REGISTRY (with its trailing slash, e.g. registry.example.com/team/) and TAG; IMAGE and
# NODE_IMAGE override the whole name. BASE_IMAGE: any Debian-like image with Python >= 3.11 and venv.
REGISTRY ?=
TAG ?= latest
BASE_IMAGE ?= python:3.11-slim-bookworm
IMAGE ?= $(REGISTRY)mishards:$(TAG)
NODE_IMAGE ?= $(REGISTRY)mishards-node:$(TAG)
# The compose file `deploy` uses: all_in_one_node.yml runs the project's node image instead of Milvus.
DEPLOY_FILE ?= all_in_one.yml
# What probe_deploy probes: `make probe_deploy host=H port=P`, as in the original.
PROBE_HOST := $(or $(host),127.0.0.1)
PROBE_PORT := $(or $(port),19530)
PROBE = $(DOCKER) run --rm --network host $(IMAGE) python all_in_one/probe_test.py

.PHONY: build push deploy clean_deploy probe_deploy deploy_m clean_deploy_m probe_deploy_m
.PHONY: cluster probe_cluster cluster_status clean_cluster style smoke-docker

build:
	$(DOCKER) build --network host --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) -f Dockerfile .
	$(DOCKER) build --network host --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(NODE_IMAGE) -f Dockerfile.node .

push:
	$(DOCKER) push $(IMAGE)
	$(DOCKER) push $(NODE_IMAGE)

deploy: clean_deploy
	cd all_in_one && MISHARDS_IMAGE=$(IMAGE) MILVUS_NODE_IMAGE=$(NODE_IMAGE) $(COMPOSE) -f $(DEPLOY_FILE) up -d

clean_deploy:
	cd all_in_one && $(COMPOSE) -f $(DEPLOY_FILE) down

probe_deploy:
	$(PROBE) --host $(PROBE_HOST) --port $(PROBE_PORT)

deploy_m: clean_deploy_m
	cd all_in_one_with_mysql && MISHARDS_IMAGE=$(IMAGE) $(COMPOSE) -f all_in_one_with_mysql.yml up -d

clean_deploy_m:
	cd all_in_one_with_mysql && $(COMPOSE) -f all_in_one_with_mysql.yml down

probe_deploy_m: probe_deploy

# The demo's namespace and proxy image: NAMESPACE (mishards) and IMAGE (above); start.sh reads them.
NAMESPACE ?= mishards
K8S = KUBECTL=$(KUBECTL) NAMESPACE=$(NAMESPACE) PROXY_IMAGE=$(IMAGE) kubernetes_demo/start.sh

cluster:
	$(K8S) cluster

# The proxy's LoadBalancer address, probed from this machine.
probe_cluster:
	address="$$($(K8S) address)" && \
	$(PROBE) --host "$${address% *}" --port "$${address#* }"

cluster_status:
	$(K8S) status

clean_cluster:
	$(K8S) delete

style: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Not part of `make test` or CI: needs root, several minutes and a private Docker engine.
smoke-docker:
	scripts/smoke_docker.sh

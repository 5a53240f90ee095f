# Developer and CI entry points. Recipes stay short; the logic lives in scripts/.
PYTHON ?= python3
PY := .venv/bin/python
PYMILVUS_VERSIONS := 0.2.12 0.2.14
WHEELS := $(foreach v,$(PYMILVUS_VERSIONS),.venv/wheels/$(v)/pymilvus-$(v)-py3-none-any.whl)
PYTEST_ARGS ?=

.PHONY: venv test run proto coverage bench

venv: .venv/.stamp $(WHEELS)

# Rebuilt when a requirements file is newer than the stamp.
.venv/.stamp: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The reference wheels for conformance tests and the real-client harness; one version per download.
$(WHEELS): | .venv/.stamp
	$(PY) -m pip download -q --no-deps -d $(@D) pymilvus==$(notdir $(@D))

test: venv
	PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test.sh

run: venv
	$(PY) scripts/local_cluster.py

proto:
	scripts/gen_proto.sh

coverage: venv
	PYTEST_ARGS="--cov=milvus_node --cov=mishards --cov=utils --cov-report=term-missing $(PYTEST_ARGS)" scripts/test.sh

# Benchmarks print tables; BENCH_ARGS passes options to the search benchmark (e.g. --rows 20000).
bench: venv
	$(PY) bench/merge_bench.py
	$(PY) bench/search_bench.py $(BENCH_ARGS)

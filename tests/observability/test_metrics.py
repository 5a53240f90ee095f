"""METRICS_PORT: Prometheus series scraped while searches stream, and after a node fails."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import LOCALHOST, MishardsProcess, NodeProcess, free_port
from tests.support.stubs import milvus_stub, search_param

from .conftest import COLLECTION, DIM, ObservedCluster, http_get


def scrape(cluster_get) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    status, text = cluster_get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over the series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def stream(address: str, stop: threading.Event, done: list, max_seconds: float = 30.0) -> None:
    queries = np.random.default_rng(5).random((2, DIM)).astype(np.float32)
    deadline = time.monotonic() + max_seconds
    with milvus_stub(address) as stub:
        param = search_param(COLLECTION, queries, 10)
        while not stop.is_set() and time.monotonic() < deadline and len(done) < 5000:
            done.append(stub.Search(param, timeout=20).status.error_code)


def test_counters_move_with_a_search_stream(observed: ObservedCluster):
    before = scrape(observed.get)
    stop, done = threading.Event(), []
    worker = threading.Thread(target=stream, args=(observed.proxy.address, stop, done))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while len(done) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        during = scrape(observed.get)
        assert value(during, "mishards_requests_total", method="Search") > value(
            before, "mishards_requests_total", method="Search"
        )
    finally:
        stop.set()
        worker.join(timeout=30)
    with milvus_stub(observed.proxy.address) as stub:  # one failed search
        bad = stub.Search(search_param("no_such_collection", np.zeros((1, DIM), np.float32), 3), timeout=20)
    assert bad.status.error_code != 0
    after = scrape(observed.get)
    searches = len(done)
    assert searches >= 20 and set(done) == {0}

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mishards_requests_total", method="Search") == searches + 1
    assert moved("mishards_request_errors_total", method="Search") == 1
    assert moved("mishards_request_duration_seconds_count", method="Search") == searches + 1
    assert moved("mishards_request_duration_seconds_bucket", method="Search", le="+Inf") == searches + 1
    # both nodes serve files of every search: two timed calls per search. A hedge (a slow call raced
    # on the other node) does not change the total, only where it lands: the loser is cancelled, untimed.
    assert sum(moved("mishards_node_call_duration_seconds_count", node=n.address) for n in observed.readonly) == (
        2 * searches
    )
    for node in observed.readonly:
        assert moved("mishards_node_errors_total", node=node.address) == 0
    assert moved("mishards_search_fanout_nodes_count") == searches
    assert moved("mishards_search_fanout_nodes_sum") == 2 * searches
    assert moved("mishards_merge_duration_seconds_count") == searches
    assert total(after, "mishards_meta_query_duration_seconds_count") > total(
        before, "mishards_meta_query_duration_seconds_count"
    )
    assert value(after, "mishards_readonly_nodes", state="healthy") == 2
    assert value(after, "mishards_readonly_nodes", state="unhealthy") == 0
    for node in observed.readonly:
        assert value(after, "mishards_node_healthy", node=node.address, role="readonly") == 1
    assert value(after, "mishards_node_healthy", node="writable", role="writable") == 1


@pytest.fixture
def failing_cluster(observed: ObservedCluster, tmp_path):
    """A proxy over one of the cluster's read-only nodes and one of its own, which the test kills."""
    meta = observed.proxy.env["SQLALCHEMY_DATABASE_URI"]
    doomed = NodeProcess("readonly", meta, observed.base / "data", log_dir=tmp_path).start()
    http_port = free_port()
    proxy = MishardsProcess(
        woserver=observed.writable.address,
        meta_uri=meta,
        ro_addresses=[observed.readonly[0].address, doomed.address],
        log_dir=tmp_path,
        extra_env={"METRICS_HOST": LOCALHOST, "METRICS_PORT": str(http_port), "TIMEOUT": "5"},
    )
    try:
        proxy.start()
        yield proxy, doomed, f"http://{LOCALHOST}:{http_port}"
    finally:
        proxy.stop()
        doomed.stop()


def test_failovers_retries_and_health_after_a_node_dies(observed: ObservedCluster, failing_cluster):
    proxy, doomed, http = failing_cluster
    survivor = observed.readonly[0].address

    def get(path: str) -> tuple[int, str]:
        return http_get(http + path)

    status, body = get("/status.json")
    assert status == 200
    (spread,) = [c["spread"] for c in json.loads(body)["collections"] if c["collection"] == COLLECTION]
    assert any(s["node"] == doomed.address and s["files"] for s in spread), f"the ring gave it no file: {spread}"
    stop, done = threading.Event(), []
    worker = threading.Thread(target=stream, args=(proxy.address, stop, done))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while len(done) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        doomed.kill()
        seen = len(done)
        while len(done) < seen + 10 and time.monotonic() < deadline + 20:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert set(done) == {0}, "searches keep answering while a node dies"
    samples = scrape(get)
    assert value(samples, "mishards_node_errors_total", node=doomed.address) >= 1
    assert value(samples, "mishards_node_failovers_total", node=doomed.address) >= 1
    assert value(samples, "mishards_node_retries_total", node=survivor) >= 1
    assert value(samples, "mishards_node_healthy", node=doomed.address, role="readonly") == 0
    assert value(samples, "mishards_readonly_nodes", state="healthy") == 1
    assert get("/readyz")[0] == 200, "one healthy node is enough to serve"


def test_metrics_include_the_standard_process_and_python_series(observed: ObservedCluster):
    status, text = observed.get("/metrics")
    assert status == 200
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert re.search(rf"^{name}(\{{.*\}})? ", text, re.M), name
    assert "python_gc_collections_total" in text

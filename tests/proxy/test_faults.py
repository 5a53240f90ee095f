"""Faults with real processes: read-only nodes killed or frozen mid-stream, the writable node down."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.observability.conftest import SpanSink, tracing_env
from tests.support import oracle
from tests.support.processes import MishardsProcess, NodeProcess, free_port
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.milvus_schema import MetricType

DIM = 16


def start_faulty_cluster(tmp_path, proxy_env: dict[str, str]):
    """Writable + 3 read-only nodes on SQLite, a proxy with a short TIMEOUT, 12 segments of data."""
    meta = f"sqlite:///{tmp_path}/meta.sqlite"
    data = tmp_path / "data"
    data.mkdir()
    procs = []
    try:
        writable = NodeProcess("writable", meta, data, log_dir=tmp_path).start()
        procs.append(writable)
        ro = [NodeProcess("readonly", meta, data, log_dir=tmp_path).start() for _ in range(3)]
        procs.extend(ro)
        proxy = MishardsProcess(
            woserver=writable.address,
            meta_uri=meta,
            ro_addresses=[n.address for n in ro],
            log_dir=tmp_path,
            extra_env={"TIMEOUT": "4", "MAX_RETRY": "3", **proxy_env},
        ).start()
        procs.append(proxy)
        rng = np.random.default_rng(7)
        vectors = rng.random((1200, DIM)).astype(np.float32)
        ids = np.arange(1200, dtype=np.int64) * 5 + 1
        with milvus_stub(proxy.address) as stub:
            assert (
                stub.CreateCollection(
                    pb.CollectionSchema(collection_name="faults", dimension=DIM, index_file_size=1024, metric_type=1)
                ).error_code
                == 0
            )
            for part in np.array_split(np.arange(1200), 12):
                reply = stub.Insert(
                    pb.InsertParam(
                        collection_name="faults",
                        row_record_array=records(vectors[part]),
                        row_id_array=ids[part].tolist(),
                    )
                )
                assert reply.status.error_code == 0
                assert stub.Flush(pb.FlushParam(collection_name_array=["faults"])).error_code == 0
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        raise
    return {"writable": writable, "ro": ro, "proxy": proxy, "vectors": vectors, "ids": ids, "procs": procs}


@pytest.fixture
def faulty_cluster(tmp_path, request):
    """The cluster above; the proxy's RPC_TRANSPORT is the test's parameter (default http2), with
    `:N` after it its SERVER_WORKERS (`http2:2`)."""
    transport, _, workers = getattr(request, "param", "http2").partition(":")
    cluster = start_faulty_cluster(
        tmp_path, {"RPC_TRANSPORT": transport, **({"SERVER_WORKERS": workers} if workers else {})}
    )
    # One connection held for the whole test: grpcio lets every channel this process opens to the
    # proxy share it, so with SERVER_WORKERS > 1 the searches and the `conn_stats` that check what
    # they did meet the same worker (each worker counts its own calls).
    with milvus_stub(cluster["proxy"].address) as keeper:
        assert keeper.Cmd(pb.Command(cmd="version"), timeout=10).status.error_code == 0  # connects
        yield cluster
    for proc in reversed(cluster["procs"]):
        proc.stop()


def stream_searches(
    address: str,
    queries: np.ndarray,
    expected,
    stop: threading.Event,
    results: list,
    max_seconds: float = 60.0,
    max_requests: int = 2000,
) -> None:
    """Search until told to stop (bounded in time and count); record (ok, elapsed, detail) per search."""
    deadline = time.monotonic() + max_seconds
    with milvus_stub(address) as stub:
        param = search_param("faults", queries, 10)
        while not stop.is_set() and time.monotonic() < deadline and len(results) < max_requests:
            start = time.monotonic()
            try:
                reply = stub.Search(param, timeout=15)
            except Exception as exc:  # noqa: BLE001 - a transport error is a failed search
                results.append((False, time.monotonic() - start, repr(exc)))
                continue
            try:
                assert reply.status.error_code == 0, reply.status
                oracle.assert_same_result(*result_rows(reply), expected)
                results.append((True, time.monotonic() - start, ""))
            except AssertionError as exc:
                results.append((False, time.monotonic() - start, str(exc)[:300]))


def run_with_fault(cluster, fault) -> list:
    queries = np.random.default_rng(1).random((3, DIM)).astype(np.float32)
    expected = oracle.brute_force(MetricType.L2, queries, cluster["vectors"], cluster["ids"], 10)
    stop, results = threading.Event(), []
    worker = threading.Thread(target=stream_searches, args=(cluster["proxy"].address, queries, expected, stop, results))
    worker.start()
    try:
        time.sleep(1.0)
        before = len(results)
        fault()
        time.sleep(6.0)
        assert len(results) > before, "searches kept flowing after the fault"
    finally:
        stop.set()
        worker.join(timeout=30)
    failures = [r for r in results if not r[0]]
    assert not failures, failures[:3]
    assert len(results) >= 10
    return results


def conn_stats(address: str) -> dict:
    with milvus_stub(address) as stub:
        return json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)


def busiest_node(cluster):
    """The read-only node that serves the most files: the ring may leave a node without any."""
    queries = np.random.default_rng(9).random((1, DIM)).astype(np.float32)
    with milvus_stub(cluster["proxy"].address) as stub:  # one connection: one worker searches and counts
        assert stub.Search(search_param("faults", queries, 3)).status.error_code == 0
        stats = json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)
    routed = {name: node["files_routed"] for name, node in stats["readonly"].items()}
    return next(node for node in cluster["ro"] if node.address == max(routed, key=routed.get))


@pytest.mark.parametrize("faulty_cluster", ["http2", "grpcio", "http2:2"], indirect=True)
def test_kill_9_of_a_readonly_node_during_searches(faulty_cluster):
    victim = busiest_node(faulty_cluster)
    run_with_fault(faulty_cluster, victim.kill)
    stats = conn_stats(faulty_cluster["proxy"].address)
    assert stats["readonly"][victim.address]["healthy"] is False
    assert stats["readonly"][victim.address]["last_error"]


@pytest.mark.parametrize("faulty_cluster", ["http2", "grpcio"], indirect=True)
def test_sigstop_of_a_readonly_node_during_searches(faulty_cluster):
    victim = busiest_node(faulty_cluster)
    try:
        results = run_with_fault(faulty_cluster, victim.pause)
        # a frozen node costs at most its hedge delay (HEDGE_MAX_DELAY 0.5 s) and one normal search,
        # and is ejected after losing 3 hedges in a row
        assert max(elapsed for _, elapsed, _ in results) < 2.0
        stats = conn_stats(faulty_cluster["proxy"].address)["readonly"]
        assert stats[victim.address]["healthy"] is False
        assert sum(node["hedges_won"] for node in stats.values()) >= 1
        assert "ejected" in stats[victim.address]["last_error"] or stats[victim.address]["ejections"] >= 1
    finally:
        victim.resume()
    # once it answers again it is probed back into service and receives files again
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if conn_stats(faulty_cluster["proxy"].address)["readonly"][victim.address]["healthy"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the resumed node did not come back")
    queries = np.random.default_rng(2).random((2, DIM)).astype(np.float32)
    with milvus_stub(faulty_cluster["proxy"].address) as stub:  # one channel: counts and searches of one worker

        def routed_to_victim() -> int:
            stats = json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)
            return stats["readonly"][victim.address]["files_routed"]

        routed = routed_to_victim()
        for _ in range(3):
            assert stub.Search(search_param("faults", queries, 5)).status.error_code == 0
        assert routed_to_victim() > routed


def test_all_readonly_nodes_down_searches_fall_back_to_the_writable_node(faulty_cluster):
    for node in faulty_cluster["ro"]:
        node.kill()
    queries = np.random.default_rng(3).random((2, DIM)).astype(np.float32)
    expected = oracle.brute_force(MetricType.L2, queries, faulty_cluster["vectors"], faulty_cluster["ids"], 10)
    with milvus_stub(faulty_cluster["proxy"].address) as stub:
        for _ in range(3):
            reply = stub.Search(search_param("faults", queries, 10), timeout=15)
            assert reply.status.error_code == 0, reply.status
            oracle.assert_same_result(*result_rows(reply), expected)
        faulty_cluster["writable"].kill()
        reply = stub.Search(search_param("faults", queries, 10), timeout=15)
        assert reply.status.error_code != 0
        assert "writable node" in reply.status.reason and "read-only" in reply.status.reason


def test_writable_node_down_searches_answer_and_writes_fail_fast(faulty_cluster):
    faulty_cluster["writable"].kill()
    queries = np.random.default_rng(4).random((2, DIM)).astype(np.float32)
    expected = oracle.brute_force(MetricType.L2, queries, faulty_cluster["vectors"], faulty_cluster["ids"], 10)
    with milvus_stub(faulty_cluster["proxy"].address) as stub:
        assert stub.Cmd(pb.Command(cmd="version")).string_reply == "0.9.1", "clients can still connect"
        reply = stub.Search(search_param("faults", queries, 10), timeout=15)
        assert reply.status.error_code == 0, reply.status
        oracle.assert_same_result(*result_rows(reply), expected)
        start = time.monotonic()
        reply = stub.Insert(pb.InsertParam(collection_name="faults", row_record_array=records(queries)), timeout=30)
        assert time.monotonic() - start < 4.0, "within TIMEOUT"
        assert reply.status.error_code == 2 and "writable node" in reply.status.reason
        status = stub.CreateCollection(
            pb.CollectionSchema(collection_name="other", dimension=4, index_file_size=1, metric_type=1)
        )
        assert status.error_code == 2


def test_unreachable_readonly_node_at_start_never_breaks_searches(tmp_path):
    meta = f"sqlite:///{tmp_path}/meta.sqlite"
    data = tmp_path / "data"
    data.mkdir()
    ghost = f"127.0.0.1:{free_port()}"
    with (
        NodeProcess("writable", meta, data, log_dir=tmp_path) as writable,
        NodeProcess("readonly", meta, data, log_dir=tmp_path) as ro,
        MishardsProcess(
            woserver=writable.address, meta_uri=meta, ro_addresses=[ghost, ro.address], log_dir=tmp_path
        ) as proxy,
        milvus_stub(proxy.address) as stub,
    ):
        vectors = np.random.default_rng(5).random((50, 4)).astype(np.float32)
        stub.CreateCollection(pb.CollectionSchema(collection_name="g", dimension=4, index_file_size=1, metric_type=1))
        reply = stub.Insert(pb.InsertParam(collection_name="g", row_record_array=records(vectors)))
        stub.Flush(pb.FlushParam())
        result = stub.Search(search_param("g", vectors[:2], 3))
        assert result.status.error_code == 0
        oracle.assert_same_result(
            *result_rows(result), oracle.brute_force(MetricType.L2, vectors[:2], vectors, reply.vector_id_array, 3)
        )
        stats = json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)
        assert ghost in stats["waiting"] and list(stats["readonly"]) == [ro.address]


def partial_scenario(cluster):
    """Files no node can answer in time: the busiest read-only node and the writable node frozen,
    no hedging and MAX_RETRY=1, so that node's files have no other candidate. The reply and the victim."""
    victim = busiest_node(cluster)
    queries = np.random.default_rng(11).random((2, DIM)).astype(np.float32)
    victim.pause()
    cluster["writable"].pause()
    try:
        with milvus_stub(cluster["proxy"].address) as stub:
            started = time.monotonic()
            reply = stub.Search(search_param("faults", queries, 10), timeout=30)  # the proxy's TIMEOUT (4 s) rules
            elapsed = time.monotonic() - started
    finally:
        victim.resume()
        cluster["writable"].resume()
    return reply, elapsed, victim, queries


PARTIAL_ENV = {"HEDGE_ENABLED": "false", "MAX_RETRY": "1", "NODE_TIMEOUT_MIN": "1"}


def test_partial_results_on_answer_what_arrived_before_the_deadline(tmp_path):
    metrics_port = free_port()
    sink = SpanSink()  # tracing on: the calls run as tasks (reload, span), the other path than test_..._off
    cluster = start_faulty_cluster(
        tmp_path,
        {
            **PARTIAL_ENV,
            "PARTIAL_RESULTS": "true",
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(metrics_port),
            **tracing_env(sink),
        },
    )
    try:
        reply, elapsed, victim, queries = partial_scenario(cluster)
        assert reply.status.error_code == 0, reply.status
        match = re.match(r"partial result: searched (\d+) of 12 files; (\d+) unanswered", reply.status.reason)
        assert match, reply.status.reason
        searched, missing = int(match[1]), int(match[2])
        assert 0 < searched < 12 and searched + missing == 12
        assert victim.address in reply.status.reason
        assert elapsed < 4.0, "answered before the client's deadline"
        # what came back is exact for the rows it covers: true distances, best first, no id twice
        got_ids, got_distances = result_rows(reply)
        by_id = dict(zip(cluster["ids"].tolist(), cluster["vectors"], strict=True))
        for query, row_ids, row_distances in zip(queries, got_ids, got_distances, strict=True):
            assert len(row_ids) == 10 and len(set(row_ids)) == 10
            true = [float(np.sum((by_id[i] - query) ** 2)) for i in row_ids]
            np.testing.assert_allclose(row_distances, true, rtol=1e-5, atol=1e-4)
            assert list(row_distances) == sorted(row_distances)
        log = (tmp_path / f"mishards-{cluster['proxy'].port}.log").read_text()
        assert "answered partially" in log
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert "mishards_partial_searches_total 1.0" in response.read().decode()
        spans = sink.wait_for(lambda spans: any(span.name == "partial_result" for span in spans))
        tags = next(span.tags for span in spans if span.name == "partial_result")
        assert tags["files_total"] == 12 and tags["files_searched"] == searched
    finally:
        for proc in reversed(cluster["procs"]):
            proc.stop()
        sink.close()


def test_partial_results_off_name_the_failed_nodes_and_files(tmp_path):
    cluster = start_faulty_cluster(tmp_path, PARTIAL_ENV)
    try:
        reply, elapsed, victim, _ = partial_scenario(cluster)
        assert reply.status.error_code == 2, reply.status  # CONNECT_FAILED
        reason = reply.status.reason
        assert "no node could search" in reason and "files " in reason
        assert victim.address in reason and cluster["writable"].address in reason
        assert elapsed < 6.0
    finally:
        for proc in reversed(cluster["procs"]):
            proc.stop()

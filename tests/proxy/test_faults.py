"""Faults with real processes: read-only nodes killed or frozen mid-stream, the writable node down."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import NodeProcess, free_port
from tests.support.stubs import milvus_stub, records, result_rows, search_param

from .conftest import MishardsProcess

DIM = 16


@pytest.fixture
def faulty_cluster(tmp_path, request):
    """Writable + 3 read-only nodes on SQLite, a proxy with a short TIMEOUT, 12 segments of data;
    the proxy's RPC_TRANSPORT is the test's parameter (default http2)."""
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
            extra_env={"TIMEOUT": "4", "MAX_RETRY": "3", "RPC_TRANSPORT": getattr(request, "param", "http2")},
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
        yield {"writable": writable, "ro": ro, "proxy": proxy, "vectors": vectors, "ids": ids}
    finally:
        for proc in reversed(procs):
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
    expected = oracle.brute_force(oracle.L2, queries, cluster["vectors"], cluster["ids"], 10)
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
    with milvus_stub(cluster["proxy"].address) as stub:
        assert stub.Search(search_param("faults", queries, 3)).status.error_code == 0
    routed = {name: node["files_routed"] for name, node in conn_stats(cluster["proxy"].address)["readonly"].items()}
    return next(node for node in cluster["ro"] if node.address == max(routed, key=routed.get))


@pytest.mark.parametrize("faulty_cluster", ["http2", "grpcio"], indirect=True)
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
        # a frozen node costs at most one attempt's share of TIMEOUT (4 s / MAX_RETRY 3), then is avoided
        assert max(elapsed for _, elapsed, _ in results) < 4.0
        assert conn_stats(faulty_cluster["proxy"].address)["readonly"][victim.address]["healthy"] is False
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
    routed = conn_stats(faulty_cluster["proxy"].address)["readonly"][victim.address]["files_routed"]
    queries = np.random.default_rng(2).random((2, DIM)).astype(np.float32)
    with milvus_stub(faulty_cluster["proxy"].address) as stub:
        for _ in range(3):
            assert stub.Search(search_param("faults", queries, 5)).status.error_code == 0
    assert conn_stats(faulty_cluster["proxy"].address)["readonly"][victim.address]["files_routed"] > routed


def test_all_readonly_nodes_down_searches_fall_back_to_the_writable_node(faulty_cluster):
    for node in faulty_cluster["ro"]:
        node.kill()
    queries = np.random.default_rng(3).random((2, DIM)).astype(np.float32)
    expected = oracle.brute_force(oracle.L2, queries, faulty_cluster["vectors"], faulty_cluster["ids"], 10)
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
    expected = oracle.brute_force(oracle.L2, queries, faulty_cluster["vectors"], faulty_cluster["ids"], 10)
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
            *result_rows(result), oracle.brute_force(oracle.L2, vectors[:2], vectors, reply.vector_id_array, 3)
        )
        stats = json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)
        assert ghost in stats["waiting"] and list(stats["readonly"]) == [ro.address]

"""SERVER_WORKERS: several proxy processes on one port, as clients and operators see them.

A real cluster (writable + 2 read-only nodes on SQLite meta) behind a proxy with 2 workers. Each
new gRPC connection lands on one worker (the kernel spreads connections over the SO_REUSEPORT
sockets), so fresh connections reach both; the tests check that data written through one
connection is found, and deletes are not, through every other (each worker reloads changed files
on the read-only nodes itself), that the side port sums the workers, and that the processes stop,
restart and exit as documented, leaving no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import milvus_pb2_grpc
from tests.observability.conftest import http_get
from tests.proxy.conftest import Cluster, MishardsProcess, start_cluster
from tests.support.processes import LOCALHOST, ManagedProcess, descendants, free_port, pid_alive
from tests.support.stubs import OPTIONS, milvus_stub, records, result_rows, search_param

DIM = 16
FRESH_CONNECTIONS = 16  # all on one worker of two: 2 ** -15


def _workers_env(workers: int, http_port: int) -> dict[str, str]:
    return {
        "SERVER_WORKERS": str(workers),
        "METRICS_HOST": LOCALHOST,
        "METRICS_PORT": str(http_port),
        "HEALTH_CHECK_INTERVAL": "0.5",
    }


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[tuple[Cluster, str]]:
    """The cluster, its proxy with 2 workers, and the proxy's side port URL."""
    base = tmp_path_factory.mktemp("workers")
    http_port = free_port()
    cluster = start_cluster(f"sqlite:///{base}/meta.sqlite", base, proxy_env=_workers_env(2, http_port))
    yield cluster, f"http://{LOCALHOST}:{http_port}"
    cluster.stop()


def _status(url: str) -> dict:
    code, body = http_get(url + "/status.json")
    assert code == 200, body
    return json.loads(body)


def _per_worker_requests(url: str) -> dict[int, int]:
    return {row["worker"]: row["requests"] for row in _status(url)["workers"]}


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


@contextmanager
def fresh_connection(address: str) -> Iterator[milvus_pb2_grpc.MilvusServiceStub]:
    """A channel with a TCP connection of its own (grpcio shares one per target between channels of
    a process unless told not to), so it lands on any worker."""
    channel = grpc.insecure_channel(address, options=[*OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
    try:
        yield milvus_pb2_grpc.MilvusServiceStub(channel)
    finally:
        channel.close()


def _search_fresh(address: str, collection: str, queries: np.ndarray) -> list[list[int]]:
    """One search on a new connection (so on any worker); the top ids per query."""
    with fresh_connection(address) as stub:
        reply = stub.Search(search_param(collection, queries, 1), timeout=30)
    assert reply.status.error_code == 0, reply.status
    return result_rows(reply)[0]


def test_workers_are_child_processes_sharing_the_port(two_workers) -> None:
    cluster, url = two_workers
    workers = descendants(cluster.proxy.pid)
    assert len(workers) == 2, "SERVER_WORKERS=2: the proxy runs two worker processes"
    before = _per_worker_requests(url)
    for _ in range(FRESH_CONNECTIONS):
        with fresh_connection(cluster.proxy.address) as stub:
            assert stub.Cmd(pb.Command(cmd="version"), timeout=10).status.error_code == 0
    after = _per_worker_requests(url)
    served = {index: after[index] - before.get(index, 0) for index in after}
    assert sum(served.values()) == FRESH_CONNECTIONS
    assert all(count > 0 for count in served.values()), f"new connections reach every worker: {served}"
    assert sorted(row["pid"] for row in _status(url)["workers"]) == sorted(workers)


def test_every_connection_sees_inserts_and_deletes_made_through_another(two_workers) -> None:
    """Reloads are right across workers: after a delete and a flush through one connection, no
    search through any other finds the deleted vectors (every worker reloads the changed files)."""
    cluster, url = two_workers
    address = cluster.proxy.address
    vectors = np.random.default_rng(7).random((120, DIM)).astype(np.float32)
    with milvus_stub(address) as writer:
        schema = pb.CollectionSchema(collection_name="workers", dimension=DIM, index_file_size=1, metric_type=1)
        assert writer.CreateCollection(schema, timeout=30).error_code == 0
        ids = []
        for part in np.array_split(np.arange(len(vectors)), 6):  # 6 segments, spread over both nodes
            reply = writer.Insert(
                pb.InsertParam(collection_name="workers", row_record_array=records(vectors[part])), timeout=30
            )
            assert reply.status.error_code == 0, reply.status
            ids += list(reply.vector_id_array)
            assert writer.Flush(pb.FlushParam(collection_name_array=["workers"]), timeout=30).error_code == 0
        ids_array = np.array(ids)
        probe = np.arange(0, 120, 7)  # a vector of every segment
        before = _per_worker_requests(url)
        for _ in range(FRESH_CONNECTIONS):
            assert _search_fresh(address, "workers", vectors[probe]) == [[int(i)] for i in ids_array[probe]]
        searched = _per_worker_requests(url)
        assert all(searched[i] > before.get(i, 0) for i in searched), f"both workers searched: {before} {searched}"

        deleted = ids_array[probe[::2]]
        status = writer.DeleteByID(pb.DeleteByIDParam(collection_name="workers", id_array=deleted.tolist()))
        assert status.error_code == 0, status
        assert writer.Flush(pb.FlushParam(collection_name_array=["workers"]), timeout=30).error_code == 0
    for _ in range(FRESH_CONNECTIONS):
        found = {row[0] for row in _search_fresh(address, "workers", vectors[probe]) if row}
        assert not found & set(deleted.tolist()), "a deleted vector was found through another connection"
        assert set(ids_array[probe[1::2]].tolist()) <= found
    after = _per_worker_requests(url)
    assert all(after[i] > searched[i] for i in after), "both workers searched after the delete"


def test_metrics_and_status_page_sum_the_workers(two_workers) -> None:
    cluster, url = two_workers
    code, text = http_get(url + "/metrics")
    assert code == 200
    searches = _metric(text, "mishards_requests_total", '{method="Cmd"}')
    for _ in range(FRESH_CONNECTIONS):
        with fresh_connection(cluster.proxy.address) as stub:
            assert stub.Cmd(pb.Command(cmd="version"), timeout=10).status.error_code == 0
    code, text = http_get(url + "/metrics")
    assert _metric(text, "mishards_requests_total", '{method="Cmd"}') == searches + FRESH_CONNECTIONS
    assert _metric(text, "mishards_workers", '{state="serving"}') == 2
    assert text.count("# TYPE mishards_requests_total counter") <= 1 and text.count("# TYPE mishards_requests ") <= 1
    # the supervisor's and both workers' CPU: at least what the workers used alone
    from bench.search_bench import cpu_seconds

    workers_cpu = sum(cpu_seconds(pid) for pid in descendants(cluster.proxy.pid))
    assert _metric(text, "process_cpu_seconds_total") >= workers_cpu - 0.05
    status = _status(url)
    cmd = next(row for row in status["requests"] if row["method"] == "Cmd")
    assert cmd["requests"] == _metric(text, "mishards_requests_total", '{method="Cmd"}')
    assert sum(row["requests"] for row in status["requests"]) == sum(row["requests"] for row in status["workers"])
    assert status["ready"] and [row["state"] for row in status["workers"]] == ["serving", "serving"]
    assert http_get(url + "/readyz") == (200, "ok\n")
    code, page = http_get(url + "/")
    assert code == 200 and "<h2>Workers</h2>" in page


def _proxy(cluster: Cluster, tmp_path, workers: int) -> tuple[MishardsProcess, str]:
    """Another proxy over the cluster's nodes, and its side port URL."""
    http_port = free_port()
    proxy = MishardsProcess(
        woserver=cluster.writable.address,
        meta_uri=cluster.meta_uri,
        ro_addresses=[node.address for node in cluster.readonly],
        log_dir=tmp_path,
        extra_env=_workers_env(workers, http_port),
    )
    return proxy, f"http://{LOCALHOST}:{http_port}"


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.1)


def test_a_killed_worker_is_restarted_and_sigterm_stops_all(two_workers, tmp_path) -> None:
    cluster, _ = two_workers
    proxy, url = _proxy(cluster, tmp_path, 2)
    with proxy:  # started: every worker serves
        first = descendants(proxy.pid)
        assert len(first) == 2
        assert [row["state"] for row in _status(url)["workers"]] == ["serving"] * 2
        os.kill(first[0], signal.SIGKILL)

        def replaced() -> bool:
            rows = _status(url)["workers"]
            return [r["state"] for r in rows] == ["serving"] * 2 and sum(r["restarts"] for r in rows) == 1

        _wait_until(replaced, 30, "a new worker replaces the killed one and serves")
        assert len(set(descendants(proxy.pid)) - set(first)) == 1
        for _ in range(FRESH_CONNECTIONS):  # every connection is served: none reaches the dead worker
            with fresh_connection(proxy.address) as stub:
                assert stub.Cmd(pb.Command(cmd="version"), timeout=10).status.error_code == 0
        workers = descendants(proxy.pid)
        assert proxy.stop(timeout_s=30) == 0, "SIGTERM: the supervisor stops its workers and exits 0"
    assert not any(pid_alive(pid) for pid in workers), "no worker outlives the supervisor"
    log = proxy.log_path.read_text()
    assert "exited with code -9; restarting it" in log


def test_a_killed_supervisor_leaves_no_worker(two_workers, tmp_path) -> None:
    cluster, _ = two_workers
    proxy = _proxy(cluster, tmp_path, 2)[0].start()
    workers = descendants(proxy.pid)
    assert len(workers) == 2
    proxy.kill()
    _wait_until(lambda: not any(pid_alive(pid) for pid in workers), 20, "the workers stop by themselves")


def test_one_worker_is_one_process(two_workers, tmp_path) -> None:
    cluster, _ = two_workers
    with _proxy(cluster, tmp_path, 1)[0] as proxy:
        with milvus_stub(proxy.address) as stub:
            assert stub.Cmd(pb.Command(cmd="version"), timeout=10).status.error_code == 0
        assert descendants(proxy.pid) == [], "SERVER_WORKERS=1 starts no other process"


def test_a_worker_that_cannot_start_stops_the_proxy_with_its_code(tmp_path) -> None:
    """A configuration error only a worker sees (an unknown router) is exit code 2 for the proxy."""
    port = free_port()
    env = dict(
        os.environ,
        WOSERVER="tcp://127.0.0.1:1",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/meta.sqlite",
        SERVER_HOST=LOCALHOST,
        SERVER_PORT=str(port),
        SERVER_WORKERS="2",
        ROUTER_CLASS_NAME="NoSuchRouter",
        LOG_PATH="",
    )
    proc = ManagedProcess("mishards", [sys.executable, "-m", "mishards"], lambda: False, tmp_path / "log", env=env)
    with pytest.raises(Exception, match="exited with code 2"):
        proc.start()
    text = proc.log_path.read_text()
    assert "ROUTER_CLASS_NAME='NoSuchRouter'" in text and "exited with code 2 before serving" in text


def test_a_taken_port_is_a_configuration_error_before_any_worker(tmp_path) -> None:
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(
            os.environ,
            WOSERVER="tcp://127.0.0.1:1",
            SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/meta.sqlite",
            SERVER_HOST=LOCALHOST,
            SERVER_PORT=str(port),
            SERVER_WORKERS="2",
        )
        done = subprocess.run(
            [sys.executable, "-m", "mishards"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 2
    assert f"SERVER_PORT={port}: cannot listen" in done.stderr, done.stderr


def test_ctrl_c_reaches_every_process_and_nothing_restarts(two_workers, tmp_path) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole process group: workers and supervisor at once."""
    cluster, _ = two_workers
    proxy = _proxy(cluster, tmp_path, 2)[0].start()
    workers = descendants(proxy.pid)
    os.killpg(os.getpgid(proxy.pid), signal.SIGINT)  # the harness starts the proxy in its own session
    deadline = time.monotonic() + 30
    while proxy.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.stop() == 0
    assert not any(pid_alive(pid) for pid in workers)
    assert "restarting" not in proxy.log_path.read_text()

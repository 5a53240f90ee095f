"""`make run` (scripts/local_cluster.py): starts the nodes, survives a frozen or dead node (restarting
the dead one), stops them all on SIGTERM, and can be started again at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import oracle
from tests.support.processes import ROOT, cmd_version_probe, descendants, free_port, port_is_free, proxy_workers_env
from tests.support.pymilvus_client import PymilvusClient
from utils.milvus_schema import MetricType

READY_LINE = "Ctrl-C stops the cluster."
Cluster = tuple[subprocess.Popen[bytes], dict[str, int], list[int], Path]


def start_script(env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "scripts.local_cluster"], cwd=ROOT, env=env, stdout=stdout, stderr=stderr
        )


def wait_ready(proc: subprocess.Popen[bytes], out: Path, err: Path) -> dict[str, int]:
    """The pid of each service, once the script printed its table."""
    deadline = time.monotonic() + 90
    while READY_LINE not in out.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, "the cluster did not come up in 90 s"
        time.sleep(0.2)
    lines = out.read_text().splitlines()
    assert READY_LINE in lines, err.read_text()
    pids = {line.split()[0]: int(line.split()[3]) for line in lines[1 : lines.index(READY_LINE)]}
    assert set(pids) == {"writable", "readonly-1", "readonly-2", "mishards"}
    return pids


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The script on free ports; yields (process, pid per service, ports, stderr file) once up."""
    ports = [free_port() for _ in range(5)]
    env = dict(os.environ, **cluster_env(ports, tmp_path))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    proc = start_script(env, out, err)
    try:
        yield proc, wait_ready(proc, out, err), ports, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def search_through_the_proxy(address: str) -> None:
    """What `make run` promises: a client on the proxy port inserts, flushes and finds its vectors."""
    import numpy as np

    from milvus_grpc import milvus_pb2 as pb
    from tests.support.stubs import milvus_stub, records, search_param

    vectors = np.random.default_rng(0).random((20, 8)).astype(np.float32)
    with milvus_stub(address) as stub:
        assert (
            stub.CreateCollection(
                pb.CollectionSchema(collection_name="run", dimension=8, index_file_size=1, metric_type=1)
            ).error_code
            == 0
        )
        ids = stub.Insert(pb.InsertParam(collection_name="run", row_record_array=records(vectors))).vector_id_array
        assert stub.Flush(pb.FlushParam()).error_code == 0
        reply = stub.Search(search_param("run", vectors[3:4], 1))
        assert reply.status.error_code == 0 and list(reply.ids) == [ids[3]]


def test_serves_every_node_stops_on_sigterm_and_starts_again_at_once(cluster: Cluster, tmp_path: Path) -> None:
    proc, pids, ports, _ = cluster
    assert all(cmd_version_probe(f"127.0.0.1:{port}")() for port in ports[:4])
    search_through_the_proxy(f"127.0.0.1:{ports[3]}")
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ports[4]}/healthz", timeout=10) as response:
        assert response.status == 200, "the proxy's status port is on"
    workers = descendants(pids["mishards"])  # SERVER_WORKERS > 1: the proxy's worker processes
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in [*pids.values(), *workers]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    proxy_log = (tmp_path / "cluster" / "logs" / "mishards.log").read_text()
    # each proxy log line is written once: one process, or a supervisor and each of its workers
    assert proxy_log.count("Mishards serving on") == (1 + len(workers) if workers else 1), proxy_log

    # at once on the same ports and data: connections the first run left in TIME_WAIT do not count as busy
    env = dict(os.environ, **cluster_env(ports, tmp_path))
    out, err = tmp_path / "stdout-2.txt", tmp_path / "stderr-2.txt"
    again = start_script(env, out, err)
    try:
        wait_ready(again, out, err)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0, err.read_text()


def cluster_env(ports: list[int], tmp_path: Path) -> dict[str, str]:
    return {
        "MILVUS_RUN_DATA_DIR": str(tmp_path / "cluster"),
        "MILVUS_RUN_WO_PORT": str(ports[0]),
        "MILVUS_RUN_RO_PORTS": f"{ports[1]},{ports[2]}",
        "MILVUS_RUN_PROXY_PORT": str(ports[3]),
        "MILVUS_RUN_STATUS_PORT": str(ports[4]),
        # no background merge: a loaded machine took over 10 s to insert the segments, and the
        # merge folded them into one file that only one read-only node could serve
        "MILVUS_NODE_MERGE_AFTER": "-1",
        **proxy_workers_env(),  # the proxy `make run` starts reads SERVER_WORKERS from the environment
    }


def test_a_port_with_only_time_wait_connections_is_free() -> None:
    """The server side closes first, as a stopping server does: its port keeps a TIME_WAIT socket."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and asyncio servers do
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = listener.accept()
    assert not port_is_free(port), "a listener makes the port busy"
    accepted.close()  # the server closes first: TIME_WAIT on the server's port
    listener.close()
    client.recv(1)  # the FIN arrived
    client.close()
    assert port_is_free(port)


def pymilvus_search_stream(
    client, name: str, queries: np.ndarray, expected, seconds: float, limit_s: float
) -> list[float]:
    """Search for `seconds`; every search must be exact and faster than limit_s. The latencies."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        status, result = client.search(name, 10, queries.tolist())
        elapsed = time.monotonic() - started
        assert status.OK(), status
        oracle.assert_same_result(result.ids, result.distances, expected)
        assert elapsed < limit_s, f"a search took {elapsed:.2f} s"
        latencies.append(elapsed)
    return latencies


def test_a_frozen_then_killed_readonly_node_costs_no_search_more_than_2_s(cluster: Cluster) -> None:
    """The real pymilvus client without a deadline: hedging hides a SIGSTOPped node; after SIGKILL
    the searches fail over at once, and the cluster restarts the node and keeps serving."""
    proc, pids, ports, stderr = cluster
    rng = np.random.default_rng(3)
    vectors = rng.random((800, 16)).astype(np.float32)
    ids = list(range(1, 801))
    queries = rng.random((2, 16)).astype(np.float32)
    expected = oracle.brute_force(MetricType.L2, queries, vectors, np.array(ids), 10)
    with PymilvusClient("127.0.0.1", ports[3]) as client:
        assert client.create_collection({"collection_name": "tail", "dimension": 16, "metric_type": 1}).OK()
        for part in np.array_split(np.arange(800), 12):  # 12 segments, spread over both read-only nodes
            status, _ = client.insert("tail", vectors[part].tolist(), ids=[ids[i] for i in part])
            assert status.OK() and client.flush(["tail"]).OK()
        pymilvus_search_stream(client, "tail", queries, expected, seconds=3, limit_s=10)  # warm-up
        # asked on the client's own connection: with SERVER_WORKERS > 1 each worker answers for
        # the searches it served, and a new connection may reach another worker
        status, reply = client.call("_cmd", "conn_stats")
        assert status.OK(), status
        routed = {address: node["files_routed"] for address, node in json.loads(reply)["readonly"].items()}
        assert all(routed.values()), f"both read-only nodes serve files: {routed}"
        victim_port = int(max(routed, key=routed.get).rsplit(":", 1)[1])
        victim = f"readonly-{ports[1:3].index(victim_port) + 1}"

        os.kill(pids[victim], signal.SIGSTOP)
        try:
            pymilvus_search_stream(client, "tail", queries, expected, seconds=6, limit_s=2.0)
        finally:
            os.kill(pids[victim], signal.SIGKILL)  # now the node dies (a stopped process takes SIGKILL)
        pymilvus_search_stream(client, "tail", queries, expected, seconds=6, limit_s=2.0)
        assert proc.poll() is None, "make run keeps serving after a child died"
        text = stderr.read_text()
        assert f"{victim} (pid {pids[victim]}) exited with code -9" in text
        # 6 s after the kill the node is back (1 s backoff, then its start); 2 s of grace for a loaded machine
        deadline = time.monotonic() + 2
        while f"restarted {victim}" not in stderr.read_text():
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.2)
        assert cmd_version_probe(f"127.0.0.1:{victim_port}")(), "the restarted node answers"
        pymilvus_search_stream(client, "tail", queries, expected, seconds=1, limit_s=2.0)

"""`make run` (scripts/local_cluster.py): starts the nodes, stops them all on SIGTERM or a death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ROOT, cmd_version_probe, free_port

READY_LINE = "Ctrl-C stops the cluster."
Cluster = tuple[subprocess.Popen[bytes], dict[str, int], list[int], Path]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The script on free ports; yields (process, pid per service, ports, stderr file) once up."""
    ports = [free_port() for _ in range(5)]
    env = dict(
        os.environ,
        MILVUS_RUN_DATA_DIR=str(tmp_path / "cluster"),
        MILVUS_RUN_WO_PORT=str(ports[0]),
        MILVUS_RUN_RO_PORTS=f"{ports[1]},{ports[2]}",
        MILVUS_RUN_PROXY_PORT=str(ports[3]),
        MILVUS_RUN_STATUS_PORT=str(ports[4]),
    )
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "local_cluster.py")],
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 90
        while READY_LINE not in out.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, "the cluster did not come up in 90 s"
            time.sleep(0.2)
        lines = out.read_text().splitlines()
        assert READY_LINE in lines, err.read_text()
        pids = {line.split()[0]: int(line.split()[3]) for line in lines[1 : lines.index(READY_LINE)]}
        assert set(pids) == {"writable", "readonly-1", "readonly-2", "mishards"}
        yield proc, pids, ports, err
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


def test_serves_every_node_and_stops_on_sigterm(cluster: Cluster) -> None:
    proc, pids, ports, _ = cluster
    assert all(cmd_version_probe(f"127.0.0.1:{port}")() for port in ports[:4])
    search_through_the_proxy(f"127.0.0.1:{ports[3]}")
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ports[4]}/healthz", timeout=10) as response:
        assert response.status == 200, "the proxy's status port is on"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_dead_node_stops_the_cluster(cluster: Cluster) -> None:
    proc, pids, ports, stderr = cluster
    os.kill(pids["readonly-1"], signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    assert "readonly-1 exited with code -9" in stderr.read_text()
    assert not any(cmd_version_probe(f"127.0.0.1:{port}", timeout_s=0.5)() for port in ports)

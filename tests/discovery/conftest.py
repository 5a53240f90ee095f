"""A real cluster for discovery tests: a writable node, three read-only nodes and 12 segments.

The read-only nodes stand for pods (see fake_kube.py); each test starts its own proxy (and fake
API server) in front of them, so the nodes and the data are made once per module.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.milvus_schema import MetricType

DIM = 16
COLLECTION = "discovery"


@dataclass
class NodeCluster:
    meta_uri: str
    data_dir: Path
    log_dir: Path
    writable: NodeProcess
    readonly: list[NodeProcess]
    vectors: np.ndarray
    ids: np.ndarray
    started: list[NodeProcess]  # every process ever started here, stopped at the end

    def restart_readonly(self, index: int) -> NodeProcess:
        """Start read-only node `index` again on its old port (after it was stopped)."""
        old = self.readonly[index]
        self.readonly[index] = NodeProcess(
            "readonly", self.meta_uri, self.data_dir, log_dir=self.log_dir, port=old.port
        )
        self.started.append(self.readonly[index])
        self.readonly[index].start()
        return self.readonly[index]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[NodeCluster]:
    base = tmp_path_factory.mktemp("discovery")
    meta, data = f"sqlite:///{base}/meta.sqlite", base / "data"
    data.mkdir()
    started: list[NodeProcess] = []
    try:
        # no background merge: these tests need the 12 segments to stay 12 files, spread over every node
        writable = NodeProcess("writable", meta, data, log_dir=base, extra_args=["--merge-after", "-1"]).start()
        started.append(writable)
        readonly = []
        for _ in range(3):
            readonly.append(NodeProcess("readonly", meta, data, log_dir=base).start())
            started.append(readonly[-1])
        rng = np.random.default_rng(11)
        vectors = rng.random((1200, DIM)).astype(np.float32)
        ids = np.arange(1200, dtype=np.int64) * 3 + 2
        with milvus_stub(writable.address) as stub:
            assert (
                stub.CreateCollection(
                    pb.CollectionSchema(collection_name=COLLECTION, dimension=DIM, index_file_size=1024, metric_type=1)
                ).error_code
                == 0
            )
            for part in np.array_split(np.arange(1200), 12):
                reply = stub.Insert(
                    pb.InsertParam(
                        collection_name=COLLECTION,
                        row_record_array=records(vectors[part]),
                        row_id_array=ids[part].tolist(),
                    )
                )
                assert reply.status.error_code == 0
                assert stub.Flush(pb.FlushParam(collection_name_array=[COLLECTION])).error_code == 0
        yield NodeCluster(meta, data, base, writable, readonly, vectors, ids, started)
    finally:
        for proc in reversed(started):
            proc.stop()


def conn_stats(address: str) -> dict:
    with milvus_stub(address) as stub:
        return json.loads(stub.Cmd(pb.Command(cmd="conn_stats"), timeout=10).string_reply)


T = TypeVar("T")


def wait_for_reading(what: str, read: Callable[[], T], holds: Callable[[T], bool], timeout_s: float = 15.0) -> T:
    """Poll `read()` (bounded) until `holds` is true of a reading, and return that reading: with
    SERVER_WORKERS > 1 each `conn_stats` may come from another worker (each checks the nodes on
    its own clock), so what is asserted next must be the reading that met the condition."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reading = read()
        if holds(reading):
            return reading
        time.sleep(0.1)
    pytest.fail(f"not within {timeout_s:g} s: {what}")


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll `predicate` (bounded); fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"not within {timeout_s:g} s: {what}")


def members(address: str) -> set[str]:
    """Names of read-only nodes in routing (joined and healthy); waiting ones count as absent."""
    return {name for name, node in conn_stats(address)["readonly"].items() if node["healthy"]}


@dataclass
class SearchStream:
    """Searches through the proxy in a thread, each checked against a brute-force oracle (bounded)."""

    address: str
    cluster: NodeCluster
    max_seconds: float = 240.0
    results: list[tuple[bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SearchStream:
        self._thread = threading.Thread(target=self._run, name="search-stream", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)

    def _run(self) -> None:
        queries = np.random.default_rng(3).random((3, DIM)).astype(np.float32)
        expected = oracle.brute_force(MetricType.L2, queries, self.cluster.vectors, self.cluster.ids, 10)
        deadline = time.monotonic() + self.max_seconds
        with milvus_stub(self.address) as stub:
            param = search_param(COLLECTION, queries, 10)
            while not self._stop.is_set() and time.monotonic() < deadline and len(self.results) < 20_000:
                try:
                    reply = stub.Search(param, timeout=15)
                    assert reply.status.error_code == 0, reply.status
                    oracle.assert_same_result(*result_rows(reply), expected)
                    self.results.append((True, ""))
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and reported
                    self.results.append((False, repr(exc)[:300]))
                time.sleep(0.02)

    def assert_all_complete(self, at_least: int = 10) -> None:
        failures = [detail for ok, detail in self.results if not ok]
        assert not failures, f"{len(failures)} of {len(self.results)} searches failed: {failures[:3]}"
        assert len(self.results) >= at_least, f"only {len(self.results)} searches ran"

"""A small real cluster for the observability tests, and a fake Jaeger agent to catch UDP spans.

Writable + 2 read-only nodes on one SQLite meta DB, 12 flushed segments of data, and two
proxies as subprocesses, both with `TRACER_CLASS_NAME=jaeger` reporting to our UDP socket:
`proxy` (the two read-only nodes; metrics and status page on a side port) and `front`, whose
only read-only "node" is `proxy`, so a search through `front` shows whether the trace context
reaches the nodes: `proxy`'s server span must be a child of `front`'s `search_<proxy>` span.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from jaeger_client.thrift_gen.agent import Agent
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.transport.TTransport import TMemoryBuffer

from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import LOCALHOST, MishardsProcess, NodeProcess, free_port
from tests.support.stubs import milvus_stub, records

DIM = 16
ROWS = 1200
SEGMENTS = 12
COLLECTION = "observed"
MASK = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: int
    span_id: int
    parent_id: int
    tags: dict


def decode_batch(datagram: bytes) -> list[Span]:
    """One `Agent.emitBatch` call in thrift's compact protocol, as jaeger-client sends it."""
    proto = TCompactProtocol(TMemoryBuffer(datagram))
    name, _type, _seq = proto.readMessageBegin()
    assert name == "emitBatch", name
    call = Agent.emitBatch_args()
    call.read(proto)
    proto.readMessageEnd()
    batch = call.batch
    spans = []
    for s in batch.spans:
        tags = {}
        for tag in s.tags or ():
            tags[tag.key] = next((v for v in (tag.vStr, tag.vBool, tag.vLong, tag.vDouble) if v is not None), None)
        spans.append(
            Span(
                batch.process.serviceName,
                s.operationName,
                s.traceIdLow & MASK,
                s.spanId & MASK,
                s.parentSpanId & MASK,
                tags,
            )
        )
    return spans


class SpanSink:
    """A fake Jaeger agent on 127.0.0.1: a thread receives and decodes datagrams until closed."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((LOCALHOST, 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="span-sink", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                datagram = self.socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            decoded = decode_batch(datagram)
            with self._lock:
                self.spans.extend(decoded)
                del self.spans[:-10_000]  # bounded

    def wait_for(self, predicate, timeout_s: float = 15.0) -> list[Span]:
        """All spans so far, once `predicate(spans)` holds (bounded; the reporter flushes every second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans) or time.monotonic() >= deadline:
                return spans
            time.sleep(0.1)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.socket.close()


@dataclass
class ObservedCluster:
    writable: NodeProcess
    readonly: list[NodeProcess]
    proxy: MishardsProcess
    front: MishardsProcess
    http: str  # base URL of proxy's side port
    sink: SpanSink
    vectors: np.ndarray
    ids: np.ndarray
    base: Path

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.http + path)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def tracing_env(sink: SpanSink) -> dict[str, str]:
    return {
        "TRACER_CLASS_NAME": "jaeger",
        "TRACING_REPORTING_HOST": LOCALHOST,
        "TRACING_REPORTING_PORT": str(sink.port),
        "JAEGER_TAGS": "ip=127.0.0.1",
    }


def load_data(address: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    vectors = rng.random((ROWS, DIM)).astype(np.float32)
    ids = np.arange(ROWS, dtype=np.int64) * 3 + 1
    with milvus_stub(address) as stub:
        assert (
            stub.CreateCollection(
                pb.CollectionSchema(collection_name=COLLECTION, dimension=DIM, index_file_size=1024, metric_type=1)
            ).error_code
            == 0
        )
        for part in np.array_split(np.arange(ROWS), SEGMENTS):
            reply = stub.Insert(
                pb.InsertParam(
                    collection_name=COLLECTION, row_record_array=records(vectors[part]), row_id_array=ids[part].tolist()
                )
            )
            assert reply.status.error_code == 0, reply.status
            assert stub.Flush(pb.FlushParam(collection_name_array=[COLLECTION])).error_code == 0
    return vectors, ids


@pytest.fixture(scope="session")
def observed(tmp_path_factory) -> ObservedCluster:
    """One cluster for every observability test (each test compares counters before and after itself)."""
    base = tmp_path_factory.mktemp("observed")
    meta = f"sqlite:///{base}/meta.sqlite"
    data = base / "data"
    data.mkdir()
    sink = SpanSink()
    procs = []
    try:
        # no background merge: the 12 segments must stay 12 files, spread over both read-only nodes
        writable = NodeProcess("writable", meta, data, log_dir=base, extra_args=["--merge-after", "-1"]).start()
        procs.append(writable)
        ro = [NodeProcess("readonly", meta, data, log_dir=base).start() for _ in range(2)]
        procs.extend(ro)
        vectors, ids = load_data(writable.address)
        http_port = free_port()
        proxy = MishardsProcess(
            woserver=writable.address,
            meta_uri=meta,
            ro_addresses=[n.address for n in ro],
            log_dir=base,
            extra_env={**tracing_env(sink), "METRICS_HOST": LOCALHOST, "METRICS_PORT": str(http_port)},
        ).start()
        procs.append(proxy)
        front = MishardsProcess(
            woserver=writable.address,
            meta_uri=meta,
            ro_addresses=[proxy.address],
            log_dir=base,
            extra_env={**tracing_env(sink), "TRACING_SERVICE_NAME": "front"},
        ).start()
        procs.append(front)
        yield ObservedCluster(writable, ro, proxy, front, f"http://{LOCALHOST}:{http_port}", sink, vectors, ids, base)
    finally:
        for proc in reversed(procs):
            proc.stop()
        sink.close()

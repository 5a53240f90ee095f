"""What the proxy does with calls that are not searches, seen by a scripted fake writable node.

The fake speaks the real protocol over loopback and records the raw bytes and deadlines it gets,
so the test can prove the proxy forwards the client's bytes unchanged and passes the deadline on.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tests.support.processes import MishardsProcess
from tests.support.stubs import OPTIONS, milvus_stub, records


class FakeMilvus:
    """A Milvus-speaking server that records every request and answers from a script."""

    def __init__(self, version: str = "0.9.1") -> None:
        self.version = version
        self.received: list[tuple[str, bytes, float | None]] = []
        self.lock = threading.Lock()
        methods = [m.name for m in pb.DESCRIPTOR.services_by_name["MilvusService"].methods]
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(name)) for name in methods}
        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTIONS)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("milvus.grpc.MilvusService", handlers)]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _handler(self, method: str):
        def handle(request: bytes, context) -> bytes:
            with self.lock:
                self.received.append((method, request, context.time_remaining()))
            if method == "Cmd":
                return pb.StringReply(string_reply=self.version).SerializeToString()
            if method == "Insert":
                n = len(pb.InsertParam.FromString(request).row_record_array)
                return pb.VectorIds(vector_id_array=list(range(n))).SerializeToString()
            if method == "CreateIndex":
                time.sleep(0.2)
            reply_type = {"HasCollection": pb.BoolReply, "DescribeCollection": pb.CollectionSchema}.get(method)
            return (reply_type() if reply_type else status_pb2.Status()).SerializeToString()

        return handle

    def requests(self, method: str) -> list[tuple[bytes, float | None]]:
        with self.lock:
            return [(raw, deadline) for m, raw, deadline in self.received if m == method]

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(params=["http2", "grpcio"])
def fake_cluster(tmp_path, request):
    """A proxy over fakes, served by each RPC_TRANSPORT."""
    writable, readonly = FakeMilvus(), FakeMilvus()
    proxy = MishardsProcess(
        woserver=writable.address,
        meta_uri=f"sqlite:///{tmp_path}/meta.sqlite",
        ro_addresses=[readonly.address],
        log_dir=tmp_path,
        extra_env={"RPC_TRANSPORT": request.param},
    ).start()
    yield proxy, writable, readonly
    proxy.stop()
    writable.stop()
    readonly.stop()


def test_requests_reach_the_writable_node_byte_for_byte(fake_cluster):
    proxy, writable, _ = fake_cluster
    vectors = np.random.default_rng(0).random((2000, 128)).astype(np.float32)
    insert = pb.InsertParam(
        collection_name="c",
        row_record_array=records(vectors),
        row_id_array=list(range(2000)),
        partition_tag="p",
        extra_params=[pb.KeyValuePair(key="params", value='{"x":1}')],
    )
    raw = insert.SerializeToString() + b"\xa0\x06\x01"  # plus an unknown field 100: kept, not re-encoded away
    channel = grpc.insecure_channel(proxy.address, options=OPTIONS)
    try:
        reply = pb.VectorIds.FromString(channel.unary_unary("/milvus.grpc.MilvusService/Insert")(raw, timeout=30))
        assert len(reply.vector_id_array) == 2000
        schema = pb.CollectionSchema(
            collection_name="c",
            dimension=8,
            index_file_size=10,
            metric_type=2,
            extra_params=[pb.KeyValuePair(key="params", value='{"a":"b"}')],
        ).SerializeToString()
        channel.unary_unary("/milvus.grpc.MilvusService/CreateCollection")(schema, timeout=30)
    finally:
        channel.close()
    assert [r for r, _ in writable.requests("Insert")] == [raw]
    assert [r for r, _ in writable.requests("CreateCollection")] == [schema], "extra_params are not dropped"


def test_the_callers_deadline_travels_with_the_call(fake_cluster):
    proxy, writable, _ = fake_cluster
    with milvus_stub(proxy.address) as stub:
        stub.CreateIndex(pb.IndexParam(collection_name="c", index_type=1), timeout=7)
        stub.DropIndex(pb.CollectionName(collection_name="c"))  # no deadline: the proxy applies TIMEOUT (20 s here)
    ((_, with_deadline),) = writable.requests("CreateIndex")
    ((_, without),) = writable.requests("DropIndex")
    assert 5.5 < with_deadline <= 7.5  # deadlines travel with some rounding
    assert 15 < without <= 20.5


def test_version_gating(tmp_path):
    old = FakeMilvus(version="0.8.0")
    good = FakeMilvus()
    try:
        # an unsupported writable node stops start-up with a clear message
        proxy = MishardsProcess(
            woserver=old.address,
            meta_uri=f"sqlite:///{tmp_path}/m.sqlite",
            ro_addresses=[good.address],
            log_dir=tmp_path,
        )
        with pytest.raises(Exception, match="0.8.0"):
            proxy.start()
        # an unsupported read-only node is left out, not added as an empty group
        with (
            MishardsProcess(
                woserver=good.address,
                meta_uri=f"sqlite:///{tmp_path}/m.sqlite",
                ro_addresses=[old.address],
                log_dir=tmp_path,
            ) as proxy,
            milvus_stub(proxy.address) as stub,
        ):
            import json

            stats = json.loads(stub.Cmd(pb.Command(cmd="conn_stats")).string_reply)
            assert stats["readonly"] == {} and old.address in stats["waiting"]
    finally:
        old.stop()
        good.stop()

"""Self-test of the real-client harness against a tiny in-test server (no milvus_node needed).

If these fail, failures of client-facing tests say nothing about the node or the proxy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from milvus_grpc import milvus_pb2, milvus_pb2_grpc, status_pb2
from tests.support.pymilvus_client import (
    PymilvusClient,
    PymilvusTimeout,
    PymilvusWorkerError,
    RemoteClientError,
    SearchResult,
    Status,
)

VERSIONS = ["0.2.12", "0.2.14"]
OK = status_pb2.Status(error_code=status_pb2.SUCCESS)


class TinyMilvus(milvus_pb2_grpc.MilvusServiceServicer):
    """Answers just enough for the harness; every other RPC is UNIMPLEMENTED."""

    def __init__(self, version: str) -> None:
        self.version = version

    def Cmd(self, request: milvus_pb2.Command, context: grpc.ServicerContext) -> milvus_pb2.StringReply:
        return milvus_pb2.StringReply(status=OK, string_reply=self.version)

    def HasCollection(self, request: milvus_pb2.CollectionName, context: grpc.ServicerContext) -> milvus_pb2.BoolReply:
        if request.collection_name == "slow":
            time.sleep(3)
        return milvus_pb2.BoolReply(status=OK, bool_reply=True)

    def Search(self, request: milvus_pb2.SearchParam, context: grpc.ServicerContext) -> milvus_pb2.TopKQueryResult:
        """Row r holds ids r*10+1 .. r*10+topk, except that the last row is cut by a -1."""
        nq, k = len(request.query_record_array), request.topk
        ids = [r * 10 + j + 1 for r in range(nq) for j in range(k)]
        ids[-1] = -1
        distances = [float(len(request.query_record_array[0].float_data))] * (nq * k)
        return milvus_pb2.TopKQueryResult(status=OK, row_num=nq, ids=ids, distances=distances)

    def DescribeIndex(self, request: milvus_pb2.CollectionName, context: grpc.ServicerContext) -> milvus_pb2.IndexParam:
        return milvus_pb2.IndexParam(
            status=OK,
            collection_name=request.collection_name,
            index_type=2,
            extra_params=[milvus_pb2.KeyValuePair(key="params", value='{"nlist":16}')],
        )


@contextmanager
def tiny_server(version: str) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(TinyMilvus(version), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture(params=VERSIONS)
def client(request: pytest.FixtureRequest) -> Iterator[PymilvusClient]:
    with tiny_server("0.9.1") as port, PymilvusClient("127.0.0.1", port, version=request.param) as c:
        yield c


def test_connects_and_reports_its_version(client: PymilvusClient) -> None:
    assert client.client_version == client.version
    status, version = client.server_version()
    assert status == Status(0, "Success!") and version == "0.9.1"  # the message is pymilvus' own


def test_has_collection(client: PymilvusClient) -> None:
    status, exists = client.has_collection("demo")
    assert status.OK() and exists is True


def test_search_decodes_rows_and_numpy_args(client: PymilvusClient) -> None:
    vectors = np.zeros((2, 4), dtype=np.float32)
    status, result = client.search("demo", 3, vectors, params={"nprobe": 1})
    assert status.OK()
    assert result == SearchResult(ids=[[1, 2, 3], [11, 12]], distances=[[4.0, 4.0, 4.0], [4.0, 4.0]], shape=(2, 3))


def test_objects_become_dicts_with_int_enums(client: PymilvusClient) -> None:
    status, index = client.get_index_info("demo")
    assert status.OK()
    assert index == {"collection_name": "demo", "index_type": 2, "params": {"nlist": 16}}
    assert type(index["index_type"]) is int


def test_grpc_failure_becomes_status_with_code_name() -> None:
    with tiny_server("0.9.1") as port, PymilvusClient("127.0.0.1", port) as c:
        status, _ = c.count_entities("demo")
    assert status.code == "UNIMPLEMENTED"
    assert not status.OK()


def test_client_side_validation_is_a_remote_error(client: PymilvusClient) -> None:
    with pytest.raises(RemoteClientError) as caught:
        client.has_collection("")
    assert caught.value.type_name == "ParamError"


@pytest.mark.parametrize("version", VERSIONS)
def test_wrong_server_version_fails_the_constructor(version: str) -> None:
    with tiny_server("0.8.0") as port, pytest.raises(RemoteClientError) as caught:
        PymilvusClient("127.0.0.1", port, version=version)
    assert caught.value.type_name == "VersionError"


def test_a_hung_call_is_bounded_and_kills_the_worker() -> None:
    with tiny_server("0.9.1") as port, PymilvusClient("127.0.0.1", port) as c:
        with pytest.raises(PymilvusTimeout):
            c.has_collection("slow", deadline_s=1)
        assert not c.alive()
        with pytest.raises(PymilvusWorkerError):
            c.has_collection("demo")

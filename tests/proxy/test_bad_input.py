"""Malformed requests and odd input through the proxy: a Milvus Status, never gRPC UNKNOWN."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.support.stubs import OPTIONS, milvus_stub, records, search_param

from .conftest import start_cluster

GARBAGE = b"\xff\xff\xff\xff\x0f\x12\x99"
METHODS = [
    "Insert",
    "Search",
    "SearchInFiles",
    "SearchByID",
    "Cmd",
    "CreateCollection",
    "DeleteByID",
    "ShowCollectionInfo",
    "Flush",
    "PreloadCollection",
    "GetVectorsByID",
    "ReloadSegments",
]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input")
    cluster = start_cluster(f"sqlite:///{base}/meta.sqlite", base, readonly=1)
    yield cluster.proxy.address
    cluster.stop()


@pytest.mark.parametrize("method", METHODS)
def test_malformed_bytes_get_a_milvus_status(proxy, method):
    channel = grpc.insecure_channel(proxy, options=OPTIONS)
    try:
        raw = channel.unary_unary(f"/milvus.grpc.MilvusService/{method}")(GARBAGE, timeout=10)
    finally:
        channel.close()
    reply_type = {
        "Insert": pb.VectorIds,
        "Search": pb.TopKQueryResult,
        "SearchInFiles": pb.TopKQueryResult,
        "SearchByID": pb.TopKQueryResult,
        "Cmd": pb.StringReply,
        "ShowCollectionInfo": pb.CollectionInfo,
        "GetVectorsByID": pb.VectorsData,
    }.get(method)
    status = reply_type.FromString(raw).status if reply_type else pb.status__pb2.Status.FromString(raw)
    assert status.error_code == 5 and "not a valid" in status.reason
    with milvus_stub(proxy) as stub:
        assert stub.Cmd(pb.Command(cmd="version")).string_reply == "0.9.1", "the proxy keeps serving"


def test_search_without_params_and_odd_but_valid_input(proxy):
    with milvus_stub(proxy) as stub:
        assert (
            stub.CreateCollection(
                pb.CollectionSchema(collection_name="odd", dimension=4, index_file_size=1, metric_type=1)
            ).error_code
            == 0
        )
        vectors = np.eye(4, dtype=np.float32)
        assert (
            stub.Insert(
                pb.InsertParam(collection_name="odd", row_record_array=records(vectors), row_id_array=[1, 2, 3, 4])
            ).status.error_code
            == 0
        )
        assert stub.Flush(pb.FlushParam()).error_code == 0
        no_params = pb.SearchParam(collection_name="odd", topk=2, query_record_array=records(vectors[:1]))
        reply = stub.Search(no_params)
        assert reply.status.error_code == 0 and reply.ids[0] == 1, "FLAT needs no search params"
        # an empty request is a valid message: the server's own checks answer it
        assert stub.Search(pb.SearchParam()).status.error_code == 9
        assert stub.SearchInFiles(pb.SearchInFilesParam()).status.error_code == 9
        assert stub.SearchByID(pb.SearchByIDParam(collection_name="odd", topk=1)).status.error_code == 12
        assert stub.SearchByID(pb.SearchByIDParam(collection_name="nope", topk=1, id_array=[1])).status.error_code == 4
        reply = stub.SearchByID(pb.SearchByIDParam(collection_name="odd", topk=2, id_array=[2, 99]))
        assert reply.status.error_code == 0 and reply.row_num == 2
        assert list(reply.ids) == [2, 1, -1, -1]
        assert stub.Search(search_param("odd", vectors[:1], 2, params='{"nprobe": 16}')).status.error_code == 0
        assert stub.Search(search_param("odd", vectors[:1], 2, params="[")).status.error_code == 5
        assert stub.Cmd(pb.Command(cmd="")).string_reply == "Unknown command"

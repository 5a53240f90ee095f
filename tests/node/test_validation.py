"""Every validation rule answers with Milvus' error code (docs/semantics.md).

The same cases run against a `single` node and through Mishards in front of a writable and a
read-only node: the proxy must answer bad input exactly as one Milvus server would.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, search_param

E = status_pb2.ErrorCode


@contextmanager
def _target(kind: str, data: Path):
    meta = f"sqlite:///{data}/meta.sqlite"
    if kind == "node":
        with NodeProcess("single", meta, data, log_dir=data) as node:
            yield node.address
        return
    from tests.support.processes import MishardsProcess

    with (
        NodeProcess("writable", meta, data, log_dir=data) as writable,
        NodeProcess("readonly", meta, data, log_dir=data) as ro,
        MishardsProcess(woserver=writable.address, meta_uri=meta, ro_addresses=[ro.address], log_dir=data) as proxy,
    ):
        yield proxy.address


@pytest.fixture(scope="module", params=["node", "proxy"])
def stub(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"validation-{request.param}")
    with _target(request.param, data) as address, milvus_stub(address) as s:
        assert s.CreateCollection(schema("floats", 8)).error_code == E.SUCCESS
        assert s.CreateCollection(schema("bits", 16, metric=3)).error_code == E.SUCCESS
        assert s.CreatePartition(pb.PartitionParam(collection_name="floats", tag="p")).error_code == E.SUCCESS
        yield s


def schema(name, dim, size=1024, metric=1):
    return pb.CollectionSchema(collection_name=name, dimension=dim, index_file_size=size, metric_type=metric)


def floats(n, dim=8):
    return np.random.default_rng(n).random((n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        ("a" * 256, "longer than 255"),
        ("1abc", "starts with a digit"),
        ("ab-c", "has a dash"),
        ("ab c", "has a blank"),
        ("名字", "not ASCII"),
    ],
)
def test_collection_name_rules(stub, name, why):
    assert stub.CreateCollection(schema(name, 8)).error_code == E.ILLEGAL_COLLECTION_NAME, why
    assert stub.HasCollection(pb.CollectionName(collection_name=name)).status.error_code == E.ILLEGAL_COLLECTION_NAME


def test_name_limits_that_pass(stub):
    for name in ("_x", "a" * 255, "A_1"):
        assert stub.CreateCollection(schema(name, 8)).error_code == E.SUCCESS
        assert stub.DropCollection(pb.CollectionName(collection_name=name)).error_code == E.SUCCESS


@pytest.mark.parametrize("dim, metric", [(0, 1), (-1, 1), (32769, 1), (12, 3), (7, 5)])
def test_dimension_rules(stub, dim, metric):
    assert stub.CreateCollection(schema("d", dim, metric=metric)).error_code == E.ILLEGAL_DIMENSION


@pytest.mark.parametrize("size", [0, -5, 4097])
def test_index_file_size_rules(stub, size):
    assert stub.CreateCollection(schema("s", 8, size=size)).error_code == E.ILLEGAL_ARGUMENT


@pytest.mark.parametrize("metric", [0, 8, -1])
def test_metric_type_rules(stub, metric):
    assert stub.CreateCollection(schema("m", 8, metric=metric)).error_code == E.ILLEGAL_METRIC_TYPE


def test_duplicate_collection(stub):
    assert stub.CreateCollection(schema("floats", 8)).error_code == E.ILLEGAL_COLLECTION_NAME


def test_missing_collection_everywhere(stub):
    name = pb.CollectionName(collection_name="nope")
    status = stub.DescribeCollection(name).status
    assert status.error_code == E.COLLECTION_NOT_EXISTS and "does not exist" in status.reason
    assert stub.HasCollection(name).status.error_code == E.SUCCESS
    assert stub.HasCollection(name).bool_reply is False
    for reply in (
        stub.CountCollection(name),
        stub.ShowCollectionInfo(name),
        stub.DescribeIndex(name),
        stub.ShowPartitions(name),
        stub.Search(search_param("nope", floats(1), 1)),
        stub.Insert(pb.InsertParam(collection_name="nope", row_record_array=records(floats(1)))),
        stub.GetVectorsByID(pb.VectorsIdentity(collection_name="nope", id_array=[1])),
    ):
        assert reply.status.error_code == E.COLLECTION_NOT_EXISTS
    for status in (
        stub.DropCollection(name),
        stub.PreloadCollection(name),
        stub.DropIndex(name),
        stub.Compact(name),
        stub.Flush(pb.FlushParam(collection_name_array=["nope"])),
        stub.DeleteByID(pb.DeleteByIDParam(collection_name="nope", id_array=[1])),
        stub.CreatePartition(pb.PartitionParam(collection_name="nope", tag="t")),
    ):
        assert status.error_code == E.COLLECTION_NOT_EXISTS


@pytest.mark.parametrize("topk", [0, -1, 2049])
def test_topk_rules(stub, topk):
    status = stub.Search(search_param("floats", floats(1), topk)).status
    assert status.error_code == E.ILLEGAL_TOPK and "1 ~ 2048" in status.reason
    reply = stub.SearchInFiles(
        pb.SearchInFilesParam(file_id_array=["1"], search_param=search_param("floats", floats(1), topk))
    )
    assert reply.status.error_code == E.ILLEGAL_TOPK


def test_topk_2048_is_allowed(stub):
    assert stub.Search(search_param("floats", floats(1), 2048)).status.error_code == E.SUCCESS


def test_vector_rules(stub):
    empty = pb.InsertParam(collection_name="floats")
    assert stub.Insert(empty).status.error_code == E.ILLEGAL_ROWRECORD
    wrong_dim = pb.InsertParam(collection_name="floats", row_record_array=records(floats(2, dim=9)))
    assert stub.Insert(wrong_dim).status.error_code == E.ILLEGAL_DIMENSION
    ragged = pb.InsertParam(collection_name="floats", row_record_array=records(floats(1)) + records(floats(1, dim=4)))
    assert stub.Insert(ragged).status.error_code == E.ILLEGAL_ROWRECORD
    float_into_binary = pb.InsertParam(collection_name="bits", row_record_array=records(floats(2, dim=16)))
    assert stub.Insert(float_into_binary).status.error_code == E.ILLEGAL_ROWRECORD
    binary_into_float = pb.InsertParam(collection_name="floats", row_record_array=[pb.RowRecord(binary_data=b"\x01")])
    assert stub.Insert(binary_into_float).status.error_code == E.ILLEGAL_ROWRECORD
    wrong_bits = pb.InsertParam(collection_name="bits", row_record_array=[pb.RowRecord(binary_data=b"\x01\x02\x03")])
    assert stub.Insert(wrong_bits).status.error_code == E.ILLEGAL_DIMENSION
    assert stub.Search(search_param("floats", floats(1, dim=3), 5)).status.error_code == E.ILLEGAL_DIMENSION
    assert stub.Search(pb.SearchParam(collection_name="floats", topk=5)).status.error_code == E.ILLEGAL_ROWRECORD


def test_id_rules(stub):
    assert stub.CreateCollection(schema("ids", 8)).error_code == E.SUCCESS
    vectors = records(floats(3))
    mismatch = pb.InsertParam(collection_name="ids", row_record_array=vectors, row_id_array=[1, 2])
    assert stub.Insert(mismatch).status.error_code == E.ILLEGAL_VECTOR_ID
    negative = pb.InsertParam(collection_name="ids", row_record_array=vectors, row_id_array=[1, -2, 3])
    assert stub.Insert(negative).status.error_code == E.ILLEGAL_VECTOR_ID
    assert (
        stub.Insert(
            pb.InsertParam(collection_name="ids", row_record_array=vectors, row_id_array=[1, 2, 3])
        ).status.error_code
        == E.SUCCESS
    )
    status = stub.Insert(pb.InsertParam(collection_name="ids", row_record_array=vectors)).status
    assert status.error_code == E.ILLEGAL_VECTOR_ID and "user-defined" in status.reason
    assert stub.CreateCollection(schema("auto_ids", 8)).error_code == E.SUCCESS
    assert (
        stub.Insert(pb.InsertParam(collection_name="auto_ids", row_record_array=vectors)).status.error_code == E.SUCCESS
    )
    status = stub.Insert(
        pb.InsertParam(collection_name="auto_ids", row_record_array=vectors, row_id_array=[7, 8, 9])
    ).status
    assert status.error_code == E.ILLEGAL_VECTOR_ID and "auto-generated" in status.reason


@pytest.mark.parametrize(
    "tag, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("t" * 256, "length"),
        ("_default", "built-in"),
        ("p", "Duplicate"),
        (" p ", "Duplicate"),
    ],
)
def test_partition_tag_rules(stub, tag, reason):
    status = stub.CreatePartition(pb.PartitionParam(collection_name="floats", tag=tag))
    assert status.error_code == E.UNEXPECTED_ERROR and reason in status.reason


def test_partition_limit(tmp_path, monkeypatch):
    from milvus_node.config import RuntimeConfig, parse_settings
    from milvus_node.db import NodeDB
    from milvus_node.meta import MetaStore, create_meta_engine
    from milvus_node.storage import SegmentStore
    from utils import validation
    from utils.errors import PartitionError

    monkeypatch.setattr(validation, "MAX_PARTITIONS", 3)
    settings = parse_settings(
        ["--data-dir", str(tmp_path), "--meta-uri", f"sqlite:///{tmp_path}/meta.sqlite", "--auto-flush-interval", "0"],
        environ={},
    )
    db = NodeDB(
        MetaStore(create_meta_engine(settings.meta_uri)), SegmentStore(str(tmp_path)), "single", RuntimeConfig(settings)
    )
    db.meta.ensure_schema(create=True)
    db.create_collection("c", 4, 1024, 1)
    for tag in ("a", "b", "c"):
        db.create_partition("c", tag)
    with pytest.raises(PartitionError, match=r"exceeds the upper limit\(3\)"):
        db.create_partition("c", "d")


def test_unknown_partition_on_insert_and_search(stub):
    reply = stub.Insert(
        pb.InsertParam(collection_name="floats", row_record_array=records(floats(1)), partition_tag="zz")
    )
    assert reply.status.error_code == E.UNEXPECTED_ERROR
    assert stub.Search(search_param("floats", floats(1), 3, tags=["zz"])).status.error_code == E.UNEXPECTED_ERROR
    assert stub.Search(search_param("floats", floats(1), 3, tags=["p"])).status.error_code == E.SUCCESS
    assert (
        stub.DropPartition(pb.PartitionParam(collection_name="floats", tag="_default")).error_code == E.UNEXPECTED_ERROR
    )
    assert stub.DropPartition(pb.PartitionParam(collection_name="floats", tag="zz")).error_code == E.UNEXPECTED_ERROR


def test_index_rules(stub):
    def index(name, kind, params="{}"):
        return pb.IndexParam(
            collection_name=name, index_type=kind, extra_params=[pb.KeyValuePair(key="params", value=params)]
        )

    for kind in (0, 7, 8, 9, 10, 13, -1):
        assert stub.CreateIndex(index("floats", kind)).error_code == E.ILLEGAL_INDEX_TYPE
    status = stub.CreateIndex(index("bits", 3, '{"nlist": 10}'))
    assert status.error_code == E.ILLEGAL_INDEX_TYPE and "metric type" in status.reason
    assert stub.CreateIndex(index("floats", 1, "not json")).error_code == E.ILLEGAL_ARGUMENT
    assert stub.CreateIndex(index("floats", 1)).error_code == E.SUCCESS
    described = stub.DescribeIndex(pb.CollectionName(collection_name="floats"))
    assert described.index_type == 1 and [(p.key, p.value) for p in described.extra_params] == [("params", "{}")]


def test_search_in_files_ids(stub):
    param = search_param("floats", floats(1), 3)
    status = stub.SearchInFiles(pb.SearchInFilesParam(file_id_array=["abc"], search_param=param)).status
    assert status.error_code == E.UNEXPECTED_ERROR
    status = stub.SearchInFiles(pb.SearchInFilesParam(file_id_array=["99999"], search_param=param)).status
    assert status.error_code == E.UNEXPECTED_ERROR and "Invalid file id" in status.reason


def test_search_params_must_be_json(stub):
    status = stub.Search(search_param("floats", floats(1), 3, params="{nprobe")).status
    assert status.error_code == E.ILLEGAL_ARGUMENT


def test_cmd_rules(stub):
    assert stub.Cmd(pb.Command(cmd="whatever")).string_reply == "Unknown command"
    assert stub.Cmd(pb.Command(cmd="get_config a.b")).status.error_code == E.ILLEGAL_ARGUMENT
    assert stub.Cmd(pb.Command(cmd="set_config server_config.port 1")).status.error_code == E.ILLEGAL_ARGUMENT
    assert (
        stub.Cmd(pb.Command(cmd="set_config db_config.auto_flush_interval -1")).status.error_code == E.ILLEGAL_ARGUMENT
    )
    assert (
        stub.Cmd(pb.Command(cmd="set_config cache_config.cpu_cache_capacity 0")).status.error_code == E.ILLEGAL_ARGUMENT
    )


def test_hybrid_rpcs_are_unimplemented(stub):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        stub.HasHybridCollection(pb.CollectionName(collection_name="floats"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

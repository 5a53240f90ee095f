"""The remaining validation rules of docs/semantics.md on a real node: index parameters,
search parameters per the collection's current index type, unavailable index types, the 256 MB
insert limit, set_config keys and values. Each case asserts the Milvus code and the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from milvus_node import index
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, search_param
from utils.milvus_schema import IndexType

E = status_pb2.ErrorCode
NSG_OK = {"search_length": 45, "out_degree": 50, "candidate_pool_size": 300, "knng": 100}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    data = tmp_path_factory.mktemp("index-validation")
    with (
        NodeProcess(
            "single", f"sqlite:///{data}/meta.sqlite", data, log_dir=data, extra_args=["--auto-flush-interval", "0"]
        ) as node,
        milvus_stub(node.address) as s,
    ):
        for name, dim, metric in (("f16", 16, 1), ("bits", 16, 3)):
            assert (
                s.CreateCollection(
                    pb.CollectionSchema(collection_name=name, dimension=dim, index_file_size=1, metric_type=metric)
                ).error_code
                == E.SUCCESS
            )
        vectors = np.random.default_rng(0).random((300, 16)).astype(np.float32)
        assert s.Insert(pb.InsertParam(collection_name="f16", row_record_array=records(vectors))).status.error_code == 0
        assert s.Flush(pb.FlushParam(collection_name_array=["f16"])).error_code == 0
        yield s


def create_index(stub, name: str, kind: int, params: dict):
    return stub.CreateIndex(
        pb.IndexParam(
            collection_name=name,
            index_type=kind,
            extra_params=[pb.KeyValuePair(key="params", value=json.dumps(params))],
        )
    )


@pytest.mark.parametrize(
    "kind, params, reason",
    [
        (2, {}, "Parameter list must contain: nlist"),
        (2, {"nlist": 0}, "Invalid nlist value: 0. Valid range is [1, 999999]"),
        (3, {"nlist": 1000000}, "Invalid nlist value: 1000000. Valid range is [1, 999999]"),
        (2, {"nlist": "16"}, "Invalid nlist: '16' is not an integer"),
        (6, {"nlist": 16}, "Parameter list must contain: m"),
        (6, {"nlist": 16, "m": 5}, "Invalid m: 5"),
        (6, {"nlist": 16, "m": 12}, "divide the dimension (16)"),
        (11, {"efConstruction": 200}, "Parameter list must contain: M"),
        (11, {"M": 4, "efConstruction": 200}, "Invalid M value: 4. Valid range is [5, 48]"),
        (11, {"M": 49, "efConstruction": 200}, "Invalid M value: 49. Valid range is [5, 48]"),
        (11, {"M": 16, "efConstruction": 99}, "Invalid efConstruction value: 99. Valid range is [100, 500]"),
        (11, {"M": 16, "efConstruction": 501}, "Invalid efConstruction value: 501. Valid range is [100, 500]"),
        (4, {**NSG_OK, "search_length": 9}, "Invalid search_length value: 9. Valid range is [10, 300]"),
        (4, {**NSG_OK, "out_degree": 301}, "Invalid out_degree value: 301. Valid range is [5, 300]"),
        (4, {**NSG_OK, "candidate_pool_size": 49}, "Invalid candidate_pool_size value: 49. Valid range is [50, 1000]"),
        (4, {**NSG_OK, "knng": 4}, "Invalid knng value: 4. Valid range is [5, 300]"),
        (4, {k: v for k, v in NSG_OK.items() if k != "knng"}, "Parameter list must contain: knng"),
        (12, {}, "Parameter list must contain: n_trees"),
        (12, {"n_trees": 0}, "Invalid n_trees value: 0. Valid range is [1, 1024]"),
        (12, {"n_trees": 1025}, "Invalid n_trees value: 1025. Valid range is [1, 1024]"),
    ],
)
def test_index_parameter_rules(stub, kind, params, reason):
    status = create_index(stub, "f16", kind, params)
    assert status.error_code == E.ILLEGAL_ARGUMENT and reason in status.reason, status
    described = stub.DescribeIndex(pb.CollectionName(collection_name="f16"))
    assert described.index_type == 1, "a rejected CreateIndex changes nothing"


def test_gpu_index_type_is_unavailable(stub):
    """IVF_SQ8H needs a GPU build. (ANNOY used to be refused here too; 0.9.1's CPU build has it.)"""
    status = create_index(stub, "f16", 5, {"nlist": 16})
    assert status.error_code == E.ILLEGAL_INDEX_TYPE and status.reason == "Unsupported index type: 5"


def test_binary_collections_take_flat_and_ivf_flat_only(stub):
    for kind in (3, 4, 6, 11):
        status = create_index(stub, "bits", kind, {"nlist": 16})
        assert (
            status.error_code == E.ILLEGAL_INDEX_TYPE
            and status.reason == "Invalid index type for collection metric type"
        )
    status = create_index(stub, "bits", 2, {})
    assert status.error_code == E.ILLEGAL_ARGUMENT and status.reason == "Parameter list must contain: nlist"


def search_status(stub, params: dict, topk: int = 10, name: str = "f16"):
    queries = np.random.default_rng(1).random((2, 16)).astype(np.float32)
    return stub.Search(search_param(name, queries, topk, params=json.dumps(params))).status


def in_files_status(stub, params: dict, topk: int = 10):
    queries = np.random.default_rng(1).random((2, 16)).astype(np.float32)
    request = pb.SearchInFilesParam(
        file_id_array=["1"], search_param=search_param("f16", queries, topk, params=json.dumps(params))
    )
    return stub.SearchInFiles(request).status


@pytest.mark.parametrize(
    "kind, build, bad, reason, good",
    [
        (2, {"nlist": 16}, {}, "Parameter list must contain: nprobe", {"nprobe": 4}),
        (2, {"nlist": 16}, {"nprobe": 0}, "Invalid nprobe value: 0. Valid range is [1, 999999]", {"nprobe": 999999}),
        (
            3,
            {"nlist": 16},
            {"nprobe": 1000000},
            "Invalid nprobe value: 1000000. Valid range is [1, 999999]",
            {"nprobe": 1},
        ),
        (6, {"nlist": 16, "m": 4}, {"ef": 20}, "Parameter list must contain: nprobe", {"nprobe": 8}),
        (11, {"M": 8, "efConstruction": 100}, {"ef": 9}, "Invalid ef value: 9. Valid range is [10, 4096]", {"ef": 10}),
        (
            11,
            {"M": 8, "efConstruction": 100},
            {"ef": 4097},
            "Invalid ef value: 4097. Valid range is [10, 4096]",
            {"ef": 4096},
        ),
        (11, {"M": 8, "efConstruction": 100}, {"nprobe": 8}, "Parameter list must contain: ef", {"ef": 64}),
        (
            4,
            NSG_OK,
            {"search_length": 9},
            "Invalid search_length value: 9. Valid range is [10, 300]",
            {"search_length": 10},
        ),
        (
            4,
            NSG_OK,
            {"search_length": 301},
            "Invalid search_length value: 301. Valid range is [10, 300]",
            {"search_length": 300},
        ),
        (
            12,
            {"n_trees": 8},
            {"search_k": 9},
            "Invalid search_k value: 9. Valid range is [10, 9223372036854775807]",
            {"search_k": 9223372036854775807},
        ),
        (
            12,
            {"n_trees": 8},
            {"search_k": -1},
            "Invalid search_k value: -1. Valid range is [10, 9223372036854775807]",
            {"search_k": 10},
        ),
        (12, {"n_trees": 8}, {"nprobe": 8}, "Parameter list must contain: search_k", {"search_k": 100}),
    ],
)
def test_search_parameters_follow_the_current_index_type(stub, kind, build, bad, reason, good):
    assert create_index(stub, "f16", kind, build).error_code == E.SUCCESS
    try:
        for status in (search_status(stub, bad), in_files_status(stub, bad)):
            assert status.error_code == E.ILLEGAL_ARGUMENT and status.reason == reason, status
        assert search_status(stub, good).error_code == E.SUCCESS
    finally:
        assert stub.DropIndex(pb.CollectionName(collection_name="f16")).error_code == E.SUCCESS
    assert search_status(stub, bad).error_code == E.SUCCESS, "FLAT checks no search parameter"


def test_annoy_search_k_rule():
    """Milvus' search rule for ANNOY: search_k in [topk, int64 max]."""
    with pytest.raises(Exception, match=r"Invalid search_k value: 9. Valid range is \[10, 9223372036854775807\]"):
        index.check_search_params(IndexType.ANNOY, 10, {"search_k": 9})
    with pytest.raises(Exception, match="Parameter list must contain: search_k"):
        index.check_search_params(IndexType.ANNOY, 10, {})
    index.check_search_params(IndexType.ANNOY, 10, {"search_k": 10})


def test_insert_limit_is_256_mb(tmp_path):
    from milvus_node.config import RuntimeConfig, parse_settings
    from milvus_node.db import NodeDB
    from milvus_node.meta import MetaStore, create_meta_engine
    from milvus_node.storage import SegmentStore
    from utils.errors import IllegalRowRecord

    settings = parse_settings(
        ["--data-dir", str(tmp_path), "--meta-uri", f"sqlite:///{tmp_path}/meta.sqlite", "--auto-flush-interval", "0"],
        environ={},
    )
    db = NodeDB(
        MetaStore(create_meta_engine(settings.meta_uri)), SegmentStore(str(tmp_path)), "single", RuntimeConfig(settings)
    )
    db.meta.ensure_schema(create=True)
    db.create_collection("big", 1024, 1024, 1)
    over = np.zeros((65537, 1024), dtype=np.float32)  # 256 MB + 4 KB (np.zeros maps pages lazily)
    with pytest.raises(IllegalRowRecord) as info:
        db.insert("big", "", over, None)
    assert info.value.code == E.ILLEGAL_ROWRECORD
    assert info.value.reason == "The amount of data inserted each time cannot exceed 256 MB"


@pytest.mark.parametrize(
    "command, reason",
    [
        ("set_config a.b 1", "Invalid config key: a.b"),
        ("get_config cache_config", "Invalid config key: cache_config"),
        ("set_config server_config.port 1", "Config server_config.port cannot be changed at run time"),
        ("set_config db_config.auto_flush_interval -1", "Invalid value '-1' for config db_config.auto_flush_interval"),
        ("set_config db_config.auto_flush_interval x", "Invalid value 'x' for config db_config.auto_flush_interval"),
        (
            "set_config cache_config.cpu_cache_capacity 0",
            "Invalid value '0' for config cache_config.cpu_cache_capacity",
        ),
        ("set_config cache_config.cpu_cache_capacity 100000", "exceeds system memory"),
        ("set_config cache_config.cache_insert_data maybe", "must be true or false"),
        ("set_config cache_config.cpu_cache_capacity", "Usage: set_config <parent>.<child> <value>"),
    ],
)
def test_set_config_rules(stub, command, reason):
    status = stub.Cmd(pb.Command(cmd=command)).status
    assert status.error_code == E.ILLEGAL_ARGUMENT and reason in status.reason, status


def test_set_config_changes_what_the_node_uses(stub):
    assert stub.Cmd(pb.Command(cmd="set_config cache_config.cpu_cache_capacity 2")).status.error_code == E.SUCCESS
    assert stub.Cmd(pb.Command(cmd="get_config cache_config.cpu_cache_capacity")).string_reply == "2"
    assert stub.Cmd(pb.Command(cmd="get_config wal_config.enable")).string_reply == "true"


def test_annoy_build_rule():
    with pytest.raises(Exception, match=r"Invalid n_trees value: 1025. Valid range is \[1, 1024\]"):
        index.check_index_params(IndexType.ANNOY, 16, {"n_trees": 1025})
    index.check_index_params(IndexType.ANNOY, 16, {"n_trees": 8})


def test_preload_beyond_the_cache_fails_with_cache_failed(tmp_path):
    from milvus_node.config import RuntimeConfig, parse_settings
    from milvus_node.db import NodeDB
    from milvus_node.meta import MetaStore, create_meta_engine
    from milvus_node.storage import SegmentStore
    from utils.errors import CacheFailed

    settings = parse_settings(
        ["--data-dir", str(tmp_path), "--meta-uri", f"sqlite:///{tmp_path}/meta.sqlite", "--auto-flush-interval", "0"],
        environ={},
    )
    db = NodeDB(
        MetaStore(create_meta_engine(settings.meta_uri)), SegmentStore(str(tmp_path)), "single", RuntimeConfig(settings)
    )
    db.meta.ensure_schema(create=True)
    db.create_collection("p", 16, 1024, 1)
    db.insert("p", "", np.zeros((1000, 16), dtype=np.float32), None)
    db.flush(["p"])
    db.preload("p")  # 1000 x (64 + 9) bytes fit in 4 GB
    db.cache.resize(10_000)
    with pytest.raises(CacheFailed) as info:
        db.preload("p")
    assert info.value.code == E.CACHE_FAILED and "Cannot preload collection p" in info.value.reason

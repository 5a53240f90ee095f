"""Indexes through the real pymilvus 0.2.12 client: create/describe/drop, search params and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.pymilvus_client import PymilvusClient

ILLEGAL_ARGUMENT, ILLEGAL_INDEX_TYPE = 5, 8


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    data = tmp_path_factory.mktemp("pymilvus-indexes")
    with (
        NodeProcess("single", f"sqlite:///{data}/meta.sqlite", data, extra_args=["--merge-after", "-1"]) as node,
        PymilvusClient(node.host, node.port) as c,
    ):
        yield c


def test_ivf_flat_through_pymilvus(client):
    dim, rows = 16, 17_000  # 17000 x 16 floats: above index_file_size = 1 MB
    vectors = np.random.default_rng(5).random((rows, dim)).astype(np.float32)
    assert client.create_collection({"collection_name": "ivf", "dimension": dim, "index_file_size": 1}).OK()
    status, ids = client.insert("ivf", vectors.tolist())
    assert status.OK()
    assert client.create_index("ivf", 2, {"nlist": 64}).OK()  # flushes, builds, then returns
    status, index = client.get_index_info("ivf")
    assert status.OK() and index["index_type"] == 2 and index["params"] == {"nlist": 64}
    status, stats = client.get_collection_stats("ivf")
    assert [s["index_name"] for s in stats["partitions"][0]["segments"]] == ["IVFFLAT"]

    queries = vectors[:3]
    status, result = client.search("ivf", 5, queries.tolist(), params={"nprobe": 64})
    assert status.OK(), status
    oracle.assert_same_result(result.ids, result.distances, oracle.brute_force(1, queries, vectors, ids, 5))
    status, _ = client.search("ivf", 5, queries.tolist())
    assert status.code == ILLEGAL_ARGUMENT and status.message == "Parameter list must contain: nprobe"
    status, _ = client.search("ivf", 5, queries.tolist(), params={"nprobe": 0})
    assert status.code == ILLEGAL_ARGUMENT and "Valid range is [1, 999999]" in status.message

    assert client.drop_index("ivf").OK()
    status, index = client.get_index_info("ivf")
    assert index["index_type"] == 1 and index["params"] == {}
    status, result = client.search("ivf", 5, queries.tolist())
    oracle.assert_same_result(result.ids, result.distances, oracle.brute_force(1, queries, vectors, ids, 5))


def test_binary_ivf_is_reported_as_ivf_flat(client):
    assert client.create_collection({"collection_name": "bits", "dimension": 64, "metric_type": 4}).OK()
    assert client.create_index("bits", 2, {"nlist": 8}).OK()
    status, index = client.get_index_info("bits")
    assert status.OK() and index["index_type"] == 2, "engine type 10 (BIN_IVFFLAT) is reported as IVF_FLAT"
    status = client.create_index("bits", 3, {"nlist": 8})
    assert status.code == ILLEGAL_INDEX_TYPE and status.message == "Invalid index type for collection metric type"

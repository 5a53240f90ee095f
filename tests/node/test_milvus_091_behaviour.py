"""What a pymilvus 0.2.12 client can tell about a Milvus 0.9.1 server, on one `single` node.

Reply width min(topk, live rows searched) and row_num = 0 without live rows; ANNOY on CPU;
CreateIndex building every file of at least 4096 rows; the 1000-id cap of GetVectorsByID;
SUBSTRUCTURE/SUPERSTRUCTURE as match filters in storage order; data_size kept until Compact.
The module runs once on SQLite meta and once on MariaDB.
"""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.pymilvus_client import PymilvusClient
from tests.support.stubs import milvus_stub, search_param
from utils.milvus_schema import FileType, IndexType, MetricType

ILLEGAL_ARGUMENT = 5


@pytest.fixture(scope="module")
def node(module_meta_uri, tmp_path_factory):
    data = tmp_path_factory.mktemp("node-091")
    # explicit flushes only, and no background merge: the tests count segments and their order
    args = ["--auto-flush-interval", "0", "--merge-after", "-1"]
    with NodeProcess("single", module_meta_uri, data, extra_args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(node):
    with PymilvusClient(node.host, node.port) as c:
        yield c


@pytest.fixture
def collection(client, request):
    name = "c_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:60]
    yield name
    client.drop_collection(name)


def file_rows(meta_uri: str, table_id: str) -> list[tuple[int, int, int]]:
    """(file_type, engine_type, row_count) of a table's files that are not being written or deleted."""
    engine = sa.create_engine(meta_uri)
    try:
        with engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    sa.text(
                        "SELECT file_type, engine_type, row_count FROM TableFiles "
                        "WHERE table_id = :t AND file_type IN (1, 2, 3, 7) ORDER BY id"
                    ),
                    {"t": table_id},
                )
            ]
    finally:
        engine.dispose()


def segments(client, name: str) -> list[dict]:
    status, stats = client.get_collection_stats(name)
    assert status.OK(), status
    return [segment for partition in stats["partitions"] for segment in partition["segments"]]


def records(array: np.ndarray):
    return [row.tobytes() for row in array] if array.dtype == np.uint8 else array.tolist()


# ------------------------------------------------------------------------------------ widths
def raw_row_num(node, collection: str, queries: list) -> int:
    """row_num of the reply on the wire (pymilvus shows (nq, 0) and (0, 0) alike)."""
    with milvus_stub(node.address) as stub:
        reply = stub.Search(search_param(collection, np.array(queries, np.float32), 10), timeout=30)
    assert reply.status.error_code == 0, reply.status
    return reply.row_num


def test_reply_is_as_wide_as_the_live_rows_searched(client, collection, node):
    assert client.create_collection({"collection_name": collection, "dimension": 8}).OK()
    queries = np.random.default_rng(1).random((3, 8)).astype(np.float32).tolist()
    status, result = client.search(collection, 10, queries)
    assert status.OK() and result.ids == [] and result.shape == (0, 0), "an empty collection: no rows"
    assert raw_row_num(node, collection, queries) == 0

    vectors = np.random.default_rng(2).random((3, 8)).astype(np.float32)
    status, ids = client.insert(collection, vectors[:1].tolist())
    assert status.OK() and client.flush([collection]).OK()
    status, result = client.search(collection, 10, queries)
    assert status.OK() and result.shape == (3, 1), "topk 10 over one live row: one column"
    assert result.ids == [ids] * 3

    status, more = client.insert(collection, vectors[1:].tolist())
    assert client.flush([collection]).OK()
    status, result = client.search(collection, 10, queries)
    assert status.OK() and result.shape == (3, 3), "two segments: 1 + 2 columns"
    assert client.delete_entity_by_id(collection, ids + more).OK() and client.flush([collection]).OK()
    status, result = client.search(collection, 10, queries)
    assert status.OK() and result.ids == [] and result.shape == (0, 0), "every row deleted: no rows"
    assert raw_row_num(node, collection, queries) == 0


def test_binary_filter_rows_are_padded_inside_the_width(client, collection):
    assert client.create_collection({"collection_name": collection, "dimension": 16, "metric_type": 6}).OK()
    data = np.array([[0b1111_0000, 0], [0b1100_0000, 0], [0, 0b1111]], dtype=np.uint8)
    status, ids = client.insert(collection, records(data), ids=[30, 20, 10])
    assert status.OK() and client.flush([collection]).OK()
    query = np.array([[0b1100_0000, 0], [0, 0b0001]], dtype=np.uint8)
    status, result = client.search(collection, 10, records(query))
    assert status.OK(), status
    assert result.shape == (2, 3), "min(topk, live rows) even when a row has fewer matches"
    assert result.ids == [[30, 20], [10]] and result.distances == [[0.0, 0.0], [0.0]]


# ------------------------------------------------------------------------------------ match filters
@pytest.mark.parametrize("metric", [MetricType.SUBSTRUCTURE, MetricType.SUPERSTRUCTURE])
def test_match_filters_keep_the_first_matches_in_storage_order(client, collection, metric):
    dim = 32
    assert client.create_collection({"collection_name": collection, "dimension": dim, "metric_type": metric}).OK()
    rng = np.random.default_rng(metric)
    stored, stored_ids = [], []
    for batch in range(3):  # three segments; ids fall while storage order rises
        vectors = np.packbits(rng.random((40, dim)) < 0.3, axis=1)
        ids = list(range(10_000 - batch * 100, 10_000 - batch * 100 - 40, -1))
        assert client.insert(collection, records(vectors), ids=ids)[0].OK()
        assert client.flush([collection]).OK()
        stored.append(vectors)
        stored_ids += ids
    data = np.vstack(stored)
    everything = (
        np.zeros((1, dim // 8), np.uint8) if metric == MetricType.SUBSTRUCTURE else np.full((1, 4), 255, np.uint8)
    )
    some = data[[5, 50, 100]] & np.packbits(rng.random((3, dim)) < 0.5, axis=1)
    if metric == MetricType.SUPERSTRUCTURE:
        some = data[[5, 50, 100]] | np.packbits(rng.random((3, dim)) < 0.5, axis=1)
    queries = np.vstack([everything, some])
    status, result = client.search(collection, 25, records(queries))
    assert status.OK(), status
    expected = oracle.brute_force(metric, queries, data, stored_ids, 25)
    assert result.ids[0] == stored_ids[:25], "every row matches: the first 25 stored, not the 25 smallest ids"
    oracle.assert_same_result(result.ids, result.distances, expected, atol=0.0)


# ------------------------------------------------------------------------------------ index build threshold
def test_create_index_builds_every_raw_file_of_4096_rows(client, collection, node):
    """6,000 x 128 rows (3 MB) in a collection of index_file_size 10 MB become IVFFLAT; 100 rows stay raw."""
    dim = 128
    assert client.create_collection({"collection_name": collection, "dimension": dim, "index_file_size": 10}).OK()
    rng = np.random.default_rng(3)
    big, small = rng.random((6000, dim)).astype(np.float32), rng.random((100, dim)).astype(np.float32)
    status, big_ids = client.insert(collection, big.tolist())
    assert status.OK() and client.flush([collection]).OK()
    status, small_ids = client.insert(collection, small.tolist())
    assert status.OK() and client.flush([collection]).OK()
    assert [s["index_name"] for s in segments(client, collection)] == ["IDMAP", "IDMAP"], "flush rule unchanged"

    assert client.create_index(collection, IndexType.IVF_FLAT, {"nlist": 64}).OK()
    by_rows = {s["row_count"]: s["index_name"] for s in segments(client, collection)}
    assert by_rows == {6000: "IVFFLAT", 100: "IDMAP"}
    assert sorted(file_rows(node.meta_uri, collection)) == [
        (FileType.RAW, 1, 100),
        (FileType.INDEX, IndexType.IVF_FLAT, 6000),
        (FileType.BACKUP, 1, 6000),
    ]
    queries = np.vstack([big[:3], small[:2]])
    status, result = client.search(collection, 10, queries.tolist(), params={"nprobe": 64})
    assert status.OK(), status
    expected = oracle.brute_force(MetricType.L2, queries, np.vstack([big, small]), big_ids + small_ids, 10)
    oracle.assert_same_result(result.ids, result.distances, expected)


# ------------------------------------------------------------------------------------ ANNOY
def test_annoy_builds_describes_searches_and_validates(client, collection, node):
    dim = 16
    assert client.create_collection({"collection_name": collection, "dimension": dim, "index_file_size": 1}).OK()
    rng = np.random.default_rng(4)
    data = rng.random((5000, dim)).astype(np.float32)
    status, ids = client.insert(collection, data[:4200].tolist())
    assert status.OK() and client.flush([collection]).OK()
    status, more = client.insert(collection, data[4200:].tolist())
    assert status.OK() and client.flush([collection]).OK()
    ids += more

    for bad in ({}, {"n_trees": 0}, {"n_trees": 1025}):
        status = client.create_index(collection, IndexType.ANNOY, bad)
        assert status.code == ILLEGAL_ARGUMENT, status
    assert client.create_index(collection, IndexType.ANNOY, {"n_trees": 1025}).message == (
        "Invalid n_trees value: 1025. Valid range is [1, 1024]"
    )
    assert client.create_index(collection, IndexType.ANNOY, {"n_trees": 16}).OK()
    status, info = client.get_index_info(collection)
    assert status.OK() and info["index_type"] == IndexType.ANNOY and info["params"] == {"n_trees": 16}
    by_rows = {s["row_count"]: s["index_name"] for s in segments(client, collection)}
    assert by_rows == {4200: "ANNOY", 800: "IDMAP"}, "the 800-row file stays raw"
    assert sorted(file_rows(node.meta_uri, collection)) == [
        (FileType.RAW, 1, 800),
        (FileType.INDEX, IndexType.ANNOY, 4200),
        (FileType.BACKUP, 1, 4200),
    ]

    queries = rng.random((20, dim)).astype(np.float32)
    status, result = client.search(collection, 10, queries.tolist(), params={"search_k": 9})
    assert status.code == ILLEGAL_ARGUMENT
    assert status.message == "Invalid search_k value: 9. Valid range is [10, 9223372036854775807]"
    assert client.search(collection, 10, queries.tolist(), params={"search_k": -1})[0].code == ILLEGAL_ARGUMENT
    assert client.search(collection, 10, queries.tolist())[0].message == "Parameter list must contain: search_k"

    expected = oracle.brute_force(MetricType.L2, queries, data, ids, 10)
    status, result = client.search(collection, 10, queries.tolist(), params={"search_k": 2**63 - 1})
    assert status.OK(), status
    oracle.assert_same_result(result.ids, result.distances, expected)  # search_k beyond the trees: exact
    status, result = client.search(collection, 10, queries.tolist(), params={"search_k": 2000})
    assert status.OK() and result.shape == (20, 10)
    pairs = zip(result.ids, expected, strict=True)
    recall = np.mean([len(set(got) & {i for i, _ in want}) / 10 for got, want in pairs])
    assert recall >= 0.8, recall
    truth = dict(zip(ids, data, strict=True))
    for row, (got, dists) in enumerate(zip(result.ids, result.distances, strict=True)):  # re-ranked exactly
        exact = [float(((truth[i].astype(np.float64) - queries[row]) ** 2).sum()) for i in got]
        np.testing.assert_allclose(dists, exact, rtol=1e-5, atol=1e-4)
        assert dists == sorted(dists)

    deleted = [ids[0], ids[1], ids[4300]]
    assert client.delete_entity_by_id(collection, deleted).OK() and client.flush([collection]).OK()
    status, result = client.search(collection, 10, data[[0, 1, 2]].tolist(), params={"search_k": 10**6})
    assert status.OK() and not set(deleted) & {i for row in result.ids for i in row}
    assert [row[0] for row in result.ids[2:]] == [ids[2]]
    assert client.drop_index(collection).OK()
    assert {s["index_name"] for s in segments(client, collection)} == {"IDMAP"}


# ------------------------------------------------------------------------------------ ids and sizes
def test_get_entity_by_id_takes_at_most_1000_ids(client, collection):
    assert client.create_collection({"collection_name": collection, "dimension": 4}).OK()
    vectors = np.random.default_rng(5).random((1200, 4)).astype(np.float32)
    status, ids = client.insert(collection, vectors.tolist())
    assert status.OK() and client.flush([collection]).OK()
    status, got = client.get_entity_by_id(collection, ids[:1001])
    assert status.code == ILLEGAL_ARGUMENT and status.message == "Input id array size cannot exceed: 1000"
    status, got = client.get_entity_by_id(collection, ids[:1000])
    assert status.OK() and len(got) == 1000
    np.testing.assert_allclose(got[999], vectors[999])
    assert client.delete_entity_by_id(collection, ids[:1100]).OK(), "DeleteByID has no cap"
    assert client.flush([collection]).OK() and client.count_entities(collection)[1] == 100


def test_a_delete_keeps_data_size_until_compact(client, collection):
    assert client.create_collection({"collection_name": collection, "dimension": 16}).OK()
    status, ids = client.insert(collection, np.random.default_rng(6).random((200, 16)).astype(np.float32).tolist())
    assert status.OK() and client.flush([collection]).OK()
    [before] = segments(client, collection)
    assert client.delete_entity_by_id(collection, ids[:50]).OK() and client.flush([collection]).OK()
    [after_delete] = segments(client, collection)
    assert after_delete["row_count"] == 150, "row_count drops when the delete is flushed"
    assert after_delete["data_size"] == before["data_size"], "the bytes stay on disk until Compact"
    assert client.compact(collection).OK()
    [after_compact] = segments(client, collection)
    assert after_compact["row_count"] == 150 and after_compact["data_size"] < before["data_size"]


def test_search_by_id_rows_keep_the_width(client, collection, node):
    """SearchByID (not in pymilvus 0.2.12, so raw gRPC): one row per id, min(topk, live rows) wide."""
    from milvus_grpc import milvus_pb2 as pb

    assert client.create_collection({"collection_name": collection, "dimension": 4}).OK()
    vectors = np.random.default_rng(7).random((2, 4)).astype(np.float32)
    assert client.insert(collection, vectors.tolist(), ids=[11, 12])[0].OK() and client.flush([collection]).OK()

    def search_by_id(ids, params='{"nprobe": 1}'):
        request = pb.SearchByIDParam(
            collection_name=collection,
            id_array=ids,
            topk=10,
            extra_params=[pb.KeyValuePair(key="params", value=params)],
        )
        with milvus_stub(node.address) as stub:
            return stub.SearchByID(request, timeout=30)

    reply = search_by_id([12, 404, 11])
    assert reply.status.error_code == 0 and reply.row_num == 3
    assert list(reply.ids) == [12, 11, -1, -1, 11, 12], "2 columns, the unknown id padded"
    reply = search_by_id([404])
    assert reply.status.error_code == 0 and reply.row_num == 0 and list(reply.ids) == []
    assert search_by_id([404], params="{").status.error_code != 0, "parameters are checked even when no id is found"

"""The real pymilvus 0.2.12 client drives a `single` node through every method in scope.

Search results are compared with a brute-force oracle: ids equal, distances within 1e-4, for L2,
IP and each binary metric, with partitions, deletes and user ids.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.pymilvus_client import PymilvusClient, RemoteClientError
from utils.milvus_schema import MetricType

OK = 0
COLLECTION_NOT_EXISTS = 4
ILLEGAL_VECTOR_ID = 12
UNEXPECTED_ERROR = 1


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data = tmp_path_factory.mktemp("single")
    with NodeProcess("single", f"sqlite:///{data}/meta.sqlite", data) as proc:
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


def float_data(n, dim, seed):
    return np.random.default_rng(seed).random((n, dim)).astype(np.float32)


def binary_data(n, dim, seed, density=0.5):
    return np.packbits(np.random.default_rng(seed).random((n, dim)) < density, axis=1)


def as_records(array: np.ndarray):
    return [bytes(row.tobytes()) for row in array] if array.dtype == np.uint8 else array.tolist()


def test_server_commands(client):
    assert client.call("client_version") == "0.2.12"
    status, version = client.server_version()
    assert status.OK() and version == "0.9.1"
    assert client.server_status()[1] == "OK"
    assert client.call("_cmd", "mode")[1] == "CPU"
    status, reply = client.call("_cmd", "rm -rf test")
    assert status.OK() and reply == "Unknown command"
    assert client.set_config("db_config", "auto_flush_interval", "2")[0].OK()
    assert client.get_config("db_config", "auto_flush_interval")[1] == "2"
    assert client.set_config("db_config", "auto_flush_interval", "1")[0].OK()
    status, _ = client.set_config("db_config", "auto_flush_interval", "soon")
    assert status.code == 5
    status, _ = client.get_config("no_such", "key")
    assert status.code == 5


def test_collection_lifecycle(client, collection):
    assert client.has_collection(collection)[1] is False
    assert client.create_collection(
        {"collection_name": collection, "dimension": 16, "index_file_size": 32, "metric_type": 2}
    ).OK()
    assert client.has_collection(collection)[1] is True
    status, schema = client.get_collection_info(collection)
    assert status.OK()
    assert (schema["collection_name"], schema["dimension"], schema["index_file_size"], schema["metric_type"]) == (
        collection,
        16,
        32,
        2,
    )
    assert collection in client.list_collections()[1]
    assert client.create_collection({"collection_name": collection, "dimension": 16}).code == 9
    assert client.drop_collection(collection).OK()
    assert client.has_collection(collection)[1] is False
    assert collection not in client.list_collections()[1]
    assert client.get_collection_info(collection)[0].code == COLLECTION_NOT_EXISTS
    # dropping and creating again under the same name works at once
    assert client.create_collection({"collection_name": collection, "dimension": 8}).OK()
    assert client.get_collection_info(collection)[1]["dimension"] == 8


@pytest.mark.parametrize("metric", [MetricType.L2, MetricType.IP])
def test_float_search_matches_oracle_with_partitions_deletes_and_user_ids(client, collection, metric, request):
    dim = 24
    assert client.set_config("db_config", "auto_flush_interval", "0")[0].OK()  # only explicit flushes here
    request.addfinalizer(lambda: client.set_config("db_config", "auto_flush_interval", "1"))
    assert client.create_collection({"collection_name": collection, "dimension": dim, "metric_type": metric}).OK()
    assert client.create_partition(collection, "red").OK()
    assert client.create_partition(collection, "blue").OK()
    data = {"_default": float_data(300, dim, 1), "red": float_data(200, dim, 2), "blue": float_data(150, dim, 3)}
    ids = {"_default": np.arange(0, 300) * 2, "red": np.arange(1000, 1200) * 3, "blue": np.arange(5000, 5150)}
    for tag, vectors in data.items():
        status, got = client.insert(
            collection, as_records(vectors), ids=ids[tag].tolist(), partition_tag=None if tag == "_default" else tag
        )
        assert status.OK() and got == ids[tag].tolist()
    assert client.count_entities(collection)[1] == 0, "unflushed data is not counted"
    assert client.flush([collection]).OK()
    assert client.count_entities(collection)[1] == 650

    deleted = [ids["_default"][5], ids["red"][7], ids["blue"][0], 999_999]
    assert client.delete_entity_by_id(collection, [int(i) for i in deleted]).OK()
    assert client.flush([collection]).OK()
    assert client.count_entities(collection)[1] == 647

    def live(tag):
        keep = ~np.isin(ids[tag], deleted)
        return data[tag][keep], ids[tag][keep]

    queries = np.vstack([float_data(4, dim, 9), data["red"][7:8], data["_default"][:2]])
    cases = {
        None: ["_default", "red", "blue"],
        ("red",): ["red"],
        ("_default",): ["_default"],
        ("b.*",): ["blue"],
        ("red", "_default"): ["red", "_default"],
    }
    for tags, covered in cases.items():
        vectors = np.vstack([live(t)[0] for t in covered])
        row_ids = np.concatenate([live(t)[1] for t in covered])
        status, result = client.search(
            collection, 10, queries.tolist(), partition_tags=list(tags) if tags else None, params={"nprobe": 16}
        )
        assert status.OK(), status
        assert result.shape == (len(queries), 10)
        oracle.assert_same_result(
            result.ids, result.distances, oracle.brute_force(metric, queries, vectors, row_ids, 10)
        )

    status, _ = client.search(collection, 10, queries.tolist(), partition_tags=["no_such_tag"])
    assert status.code == UNEXPECTED_ERROR

    # a topk larger than the data: rows are cut at the -1 padding
    status, result = client.search(collection, 2048, queries[:1].tolist(), partition_tags=["blue"])
    assert status.OK() and len(result.ids[0]) == 149


@pytest.mark.parametrize("metric", oracle.BINARY_METRICS)
def test_binary_search_matches_oracle(client, collection, metric):
    dim = 64
    assert client.create_collection({"collection_name": collection, "dimension": dim, "metric_type": metric}).OK()
    density = 0.3 if metric in (MetricType.SUBSTRUCTURE, MetricType.SUPERSTRUCTURE) else 0.5
    data = binary_data(400, dim, 4, density)
    status, ids = client.insert(collection, as_records(data))
    assert status.OK() and len(ids) == 400
    assert client.flush([collection]).OK()
    assert client.delete_entity_by_id(collection, ids[:3]).OK()
    assert client.flush([collection]).OK()
    # sub/superstructure queries: take stored vectors with bits removed / added so some qualify
    queries = binary_data(3, dim, 5, density)
    if metric == MetricType.SUBSTRUCTURE:
        queries = np.vstack([queries, data[10:13] & binary_data(3, dim, 6, 0.5)])
    if metric == MetricType.SUPERSTRUCTURE:
        queries = np.vstack([queries, data[10:13] | binary_data(3, dim, 6, 0.5)])
    status, result = client.search(collection, 20, as_records(queries))
    assert status.OK(), status
    expected = oracle.brute_force(metric, queries, data[3:], np.asarray(ids[3:]), 20)
    oracle.assert_same_result(result.ids, result.distances, expected)
    status, index = client.get_index_info(collection)
    assert status.OK() and index["index_type"] == 1, "binary FLAT (engine 9) is reported as FLAT"


def test_entities_segments_stats_index_and_compact(client, collection):
    dim = 8
    assert client.create_collection({"collection_name": collection, "dimension": dim}).OK()
    assert client.create_partition(collection, "p1").OK()
    vectors = float_data(50, dim, 7)
    status, ids = client.insert(collection, vectors[:30].tolist())
    assert status.OK()
    status, ids2 = client.insert(collection, vectors[30:].tolist(), partition_tag="p1")
    assert status.OK()
    status, _ = client.insert(collection, vectors[:2].tolist(), ids=[1, 2])
    assert status.code == ILLEGAL_VECTOR_ID, "auto ids fixed the id mode"
    assert client.flush().OK()

    status, got = client.get_entity_by_id(collection, [ids[3], 424242, ids2[1]])
    assert status.OK()
    np.testing.assert_allclose(got[0], vectors[3])
    assert got[1] == []
    np.testing.assert_allclose(got[2], vectors[31])

    status, stats = client.get_collection_stats(collection)
    assert status.OK()
    assert stats["row_count"] == 50
    assert [p["tag"] for p in stats["partitions"]] == ["_default", "p1"]
    segment = stats["partitions"][0]["segments"][0]
    assert segment["row_count"] == 30 and segment["index_name"] == "IDMAP"
    status, seg_ids = client.list_id_in_segment(collection, segment["name"])
    assert status.OK() and sorted(seg_ids) == sorted(ids)

    status, index = client.get_index_info(collection)
    assert status.OK()
    assert index["index_type"] == 1 and index["params"] == {}
    assert client.create_index(collection, 1, {}).OK()
    assert client.drop_index(collection).OK()
    assert client.load_collection(collection).OK()

    assert client.delete_entity_by_id(collection, ids[:10]).OK()
    assert client.flush([collection]).OK()
    assert client.compact(collection).OK()
    status, stats = client.get_collection_stats(collection)
    assert stats["row_count"] == 40
    status, seg_ids = client.list_id_in_segment(collection, stats["partitions"][0]["segments"][0]["name"])
    assert sorted(seg_ids) == sorted(ids[10:])
    status, got = client.get_entity_by_id(collection, ids[:1])
    assert got == [[]]

    status, partitions = client.list_partitions(collection)
    assert [p["tag"] for p in partitions] == ["_default", "p1"]
    assert client.has_partition(collection, "p1")[1] is True
    assert client.drop_partition(collection, "p1").OK()
    assert client.has_partition(collection, "p1")[1] is False
    assert client.count_entities(collection)[1] == 20


def test_search_in_segment_by_file_id(client, collection, node):
    import sqlalchemy as sa

    dim = 8
    assert client.create_collection({"collection_name": collection, "dimension": dim}).OK()
    vectors = float_data(40, dim, 8)
    _, ids_a = client.insert(collection, vectors[:20].tolist())
    assert client.flush([collection]).OK()
    _, ids_b = client.insert(collection, vectors[20:].tolist())
    assert client.flush([collection]).OK()
    engine = sa.create_engine(node.meta_uri)
    with engine.connect() as conn:
        file_ids = [
            r[0]
            for r in conn.execute(
                sa.text("SELECT id FROM TableFiles WHERE table_id = :t AND file_type = 1 ORDER BY id"),
                {"t": collection},
            )
        ]
    engine.dispose()
    assert len(file_ids) == 2
    status, result = client.search_in_segment(collection, [file_ids[1]], vectors[:3].tolist(), 5)
    assert status.OK(), status
    oracle.assert_same_result(
        result.ids, result.distances, oracle.brute_force(MetricType.L2, vectors[:3], vectors[20:], ids_b, 5)
    )
    status, _ = client.search_in_segment(collection, [987654321], vectors[:1].tolist(), 5)
    assert status.code == UNEXPECTED_ERROR


def test_auto_flush_makes_inserts_visible(client, collection):
    assert client.create_collection({"collection_name": collection, "dimension": 4}).OK()
    assert client.insert(collection, float_data(10, 4, 1).tolist())[0].OK()
    import time

    deadline = time.monotonic() + 10
    while client.count_entities(collection)[1] != 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.count_entities(collection)[1] == 10


def test_client_side_errors_surface(client):
    with pytest.raises(RemoteClientError):
        client.create_collection({"collection_name": "x"})

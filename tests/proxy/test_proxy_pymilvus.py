"""The real pymilvus 0.2.12 client drives Mishards through every `milvus.Milvus` method.

Every search through the proxy must equal what one `single` node holding the same data returns
(same ids, distances within 1e-4): L2, IP and the binary metrics, partitions (with `_default`
and tags that match nothing), several segments spread unevenly over two read-only nodes, and
deletes. The module runs once on SQLite meta and once on MariaDB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.proxy.conftest import same_search
from tests.support import oracle


def records(array):
    return [row.tobytes() for row in array] if array.dtype == np.uint8 else array.tolist()


@pytest.mark.parametrize("metric", [1, 2])
def test_float_search_equals_single_node(both, metric):
    name, call = both
    dim = 16
    rng = np.random.default_rng(metric)
    for status in call("create_collection", {"collection_name": name, "dimension": dim, "metric_type": metric}):
        assert status.OK()
    for tag in ("red", "blue"):
        call("create_partition", name, tag)
    next_id = 1
    # many small segments per table: flush after each batch, so the ring spreads them unevenly
    for batch, tag in enumerate(["red", None, "blue", None, "red", None, "blue", None, None, "red"]):
        n = 30 + 7 * batch
        vectors = rng.random((n, dim)).astype(np.float32)
        ids = list(range(next_id, next_id + n))
        next_id += n
        got, want = call("insert", name, records(vectors), ids=ids, partition_tag=tag)
        assert got[0].OK() and got[1] == want[1] == ids
        assert all(s.OK() for s in call("flush", [name]))
    got, want = call("count_entities", name)
    assert got == want and got[1] == next_id - 1
    queries = rng.random((6, dim)).astype(np.float32)
    for tags in (None, ["_default"], ["red"], ["blue", "_default"], ["r.*"], ["no_such_tag"], [" red "]):
        for topk in (1, 10, 100):
            same_search(*call("search", name, topk, queries.tolist(), partition_tags=tags))
    # deletes become visible through the proxy as on one server
    assert all(s.OK() for s in call("delete_entity_by_id", name, list(range(1, 200, 3))))
    assert all(s.OK() for s in call("flush", [name]))
    for tags in (None, ["red"], ["_default"]):
        same_search(*call("search", name, 20, queries.tolist(), partition_tags=tags))
    got, want = call("count_entities", name)
    assert got == want


@pytest.mark.parametrize("metric", oracle.BINARY_METRICS)
def test_binary_search_equals_single_node(both, metric):
    name, call = both
    dim = 64
    rng = np.random.default_rng(metric)
    assert all(
        s.OK() for s in call("create_collection", {"collection_name": name, "dimension": dim, "metric_type": metric})
    )
    density = 0.3 if metric in (6, 7) else 0.5
    stored = []
    for batch in range(5):
        vectors = np.packbits(rng.random((60, dim)) < density, axis=1)
        stored.append(vectors)
        ids = list(range(batch * 100, batch * 100 + 60))
        got, want = call("insert", name, records(vectors), ids=ids)
        assert got[0].OK() and want[0].OK()
        assert all(s.OK() for s in call("flush", [name]))
    data = np.vstack(stored)
    queries = np.packbits(rng.random((4, dim)) < density, axis=1)
    if metric == 6:
        queries = np.vstack([queries, data[[3, 70, 200]] & np.packbits(rng.random((3, dim)) < 0.5, axis=1)])
    if metric == 7:
        queries = np.vstack([queries, data[[3, 70, 200]] | np.packbits(rng.random((3, dim)) < 0.5, axis=1)])
    same_search(*call("search", name, 15, records(queries)))
    assert all(s.OK() for s in call("delete_entity_by_id", name, [3, 70, 200, 201]))
    assert all(s.OK() for s in call("flush", [name]))
    same_search(*call("search", name, 15, records(queries)))


def test_every_other_method_through_the_proxy(both, clients):
    name, call = both
    proxy, _ = clients
    assert proxy.server_version()[1] == "0.9.1"
    assert proxy.server_status()[1] == "OK"
    assert proxy.call("_cmd", "mode")[1] == "CPU"
    assert proxy.set_config("db_config", "auto_flush_interval", "1")[0].OK()
    assert proxy.get_config("db_config", "auto_flush_interval")[1] == "1"
    assert proxy.has_collection(name)[1] is False
    assert all(
        s.OK() for s in call("create_collection", {"collection_name": name, "dimension": 8, "index_file_size": 64})
    )
    got, want = call("get_collection_info", name)
    assert got == want
    assert name in proxy.list_collections()[1]
    assert proxy.create_partition(name, "p").OK()
    assert proxy.has_partition(name, "p")[1] is True
    assert [p["tag"] for p in proxy.list_partitions(name)[1]] == ["_default", "p"]
    vectors = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    status, ids = proxy.insert(name, vectors.tolist())
    assert status.OK() and len(ids) == 40
    assert proxy.flush().OK()
    assert proxy.count_entities(name)[1] == 40
    status, got = proxy.get_entity_by_id(name, ids[:2] + [12345])
    assert status.OK()
    np.testing.assert_allclose(got[0], vectors[0])
    assert got[2] == []
    status, stats = proxy.get_collection_stats(name)
    assert status.OK() and stats["row_count"] == 40
    segment = stats["partitions"][0]["segments"][0]["name"]
    status, seg_ids = proxy.list_id_in_segment(name, segment)
    assert status.OK() and sorted(seg_ids) == sorted(ids)
    assert proxy.create_index(name, 1, {}).OK()
    status, index = proxy.get_index_info(name)
    assert status.OK() and index["index_type"] == 1
    assert proxy.drop_index(name).OK()
    assert proxy.load_collection(name).OK()
    assert proxy.delete_entity_by_id(name, ids[:5]).OK()
    assert proxy.flush([name]).OK()
    assert proxy.compact(name).OK()
    assert proxy.count_entities(name)[1] == 35
    status, result = proxy.search_in_segment(name, [987654321], vectors[:2].tolist(), 3)
    assert status.code == 1 and "Invalid file id" in status.message
    assert proxy.drop_partition(name, "p").OK()
    status, conn_stats = proxy.call("_cmd", "conn_stats")
    stats = json.loads(conn_stats)
    assert status.OK() and len(stats["readonly"]) == 2 and stats["writable"]["healthy"]
    assert proxy.drop_collection(name).OK()
    assert proxy.has_collection(name)[1] is False
    # a re-created collection with another metric is searched with the new direction at once
    assert proxy.create_collection({"collection_name": name, "dimension": 8, "metric_type": 2}).OK()
    _, ids = proxy.insert(name, vectors.tolist())
    assert proxy.flush([name]).OK()
    status, result = proxy.search(name, 5, vectors[:1].tolist())
    expected = oracle.brute_force(2, vectors[:1], vectors, ids, 5)
    oracle.assert_same_result(result.ids, result.distances, expected)


def test_unflushed_collection_falls_back_to_the_writable_node(both):
    name, call = both
    assert all(s.OK() for s in call("create_collection", {"collection_name": name, "dimension": 4}))
    same_search(*call("search", name, 5, [[0.1, 0.2, 0.3, 0.4]]))

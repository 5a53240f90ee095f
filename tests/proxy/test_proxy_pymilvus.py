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

from tests.support import oracle
from tests.support.pymilvus_client import PymilvusClient

OK = 0


@pytest.fixture(scope="module")
def clients(cluster):
    with (
        PymilvusClient(cluster.proxy.host, cluster.proxy.port) as proxy,
        PymilvusClient(cluster.reference.host, cluster.reference.port) as reference,
    ):
        yield proxy, reference


@pytest.fixture
def both(clients, request):
    """Run the same call on the proxy and on the reference node; return both results."""
    proxy, reference = clients
    name = "c_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:60]

    def call(method, *args, **kwargs):
        return getattr(proxy, method)(*args, **kwargs), getattr(reference, method)(*args, **kwargs)

    yield name, call
    call("drop_collection", name)


def same_search(got, want):
    (status_a, result_a), (status_b, result_b) = got, want
    assert status_a.code == status_b.code, (status_a, status_b)
    if status_a.code != OK:
        return
    assert result_a.shape == result_b.shape
    for row_a, row_b, dist_a, dist_b in zip(
        result_a.ids, result_b.ids, result_a.distances, result_b.distances, strict=True
    ):
        assert row_a == row_b
        np.testing.assert_allclose(dist_a, dist_b, rtol=1e-5, atol=1e-4)


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


# --------------------------------------------------------------- Milvus 0.9.1 widths, filters, ANNOY
def files_routed(proxy) -> dict[str, int]:
    status, reply = proxy.call("_cmd", "conn_stats")
    assert status.OK()
    return {name: node["files_routed"] for name, node in json.loads(reply)["readonly"].items()}


def search_on_both_nodes(proxy, call, *args, **kwargs):
    """`call("search", ...)` on the proxy and the reference, checking the proxy routed files to both
    read-only nodes."""
    before = files_routed(proxy)
    replies = call("search", *args, **kwargs)
    after = files_routed(proxy)
    assert len(after) == 2 and all(after[name] > before.get(name, 0) for name in after), (before, after)
    return replies


def wire_row_num(address: str, name: str, queries: np.ndarray, topk: int) -> int:
    from tests.support.stubs import milvus_stub, search_param

    with milvus_stub(address) as stub:
        reply = stub.Search(search_param(name, queries, topk), timeout=30)
    assert reply.status.error_code == 0, reply.status
    return reply.row_num


@pytest.mark.parametrize("metric", [1, 2, 3, 4, 5, 6, 7])
def test_reply_width_is_one_nodes_width_over_nodes(both, clients, cluster, metric):
    """min(topk, live rows) wide, as one node over all files; no rows once every row is deleted."""
    name, call = both
    proxy, _ = clients
    binary = metric > 2
    dim = 16
    assert all(
        s.OK() for s in call("create_collection", {"collection_name": name, "dimension": dim, "metric_type": metric})
    )
    rng = np.random.default_rng(10 + metric)
    stored = []
    for segment in range(8):  # 8 segments of 1 row: the ring puts files on both read-only nodes
        vector = np.zeros((1, dim // 8), np.uint8) if binary else rng.random((1, dim)).astype(np.float32)
        if binary:
            vector[0, 0] = 1 << segment  # distinct rows; a zero query is a substructure of each
        got, want = call("insert", name, records(vector), ids=[segment + 1])
        assert got[0].OK() and want[0].OK()
        assert all(s.OK() for s in call("flush", [name]))
        stored.append(vector)
    queries = np.zeros((2, dim // 8), np.uint8) if binary else rng.random((2, dim)).astype(np.float32)
    if binary:
        queries[1] = 0xFF  # a superstructure of every row; a substructure of none
    (status, result), want = search_on_both_nodes(proxy, call, name, 10, records(queries))
    assert status.OK(), status
    assert result.shape == want[1].shape == (2, 8), "min(topk 10, 8 live rows)"
    if metric in (6, 7):  # match filters: as many matches, each a real one at 0.0
        assert [len(row) for row in result.ids] == [len(row) for row in want[1].ids]
        assert all(d == 0.0 for row in result.distances for d in row)
        assert all(set(row) <= set(range(1, 9)) for row in result.ids)
    else:
        same_search((status, result), want)
    (status, result), want = search_on_both_nodes(proxy, call, name, 3, records(queries))
    assert result.shape == want[1].shape == (2, 3)

    assert all(s.OK() for s in call("delete_entity_by_id", name, list(range(1, 9))))
    assert all(s.OK() for s in call("flush", [name]))
    (status, result), (want_status, want_result) = search_on_both_nodes(proxy, call, name, 10, records(queries))
    assert status.OK() and want_status.OK()
    assert result.ids == want_result.ids == [] and result.shape == (0, 0)
    assert wire_row_num(cluster.proxy.address, name, queries, 10) == 0
    assert wire_row_num(cluster.reference.address, name, queries, 10) == 0


@pytest.mark.parametrize("metric", [6, 7])
def test_match_filters_through_the_proxy(both, clients, metric):
    """Every reported id a match at 0.0, min(topk, matches) of them, the same order every time."""
    name, call = both
    proxy, _ = clients
    dim = 32
    assert all(
        s.OK() for s in call("create_collection", {"collection_name": name, "dimension": dim, "metric_type": metric})
    )
    rng = np.random.default_rng(metric)
    stored = []
    for batch in range(6):
        vectors = np.packbits(rng.random((20, dim)) < 0.3, axis=1)
        ids = list(range(1000 - batch * 50, 1000 - batch * 50 - 20, -1))
        assert all(r[0].OK() for r in call("insert", name, records(vectors), ids=ids))
        assert all(s.OK() for s in call("flush", [name]))
        stored.append((vectors, ids))
    data = np.vstack([v for v, _ in stored])
    all_ids = np.array([i for _, ids in stored for i in ids])
    every_row = np.zeros((1, 4), np.uint8) if metric == 6 else np.full((1, 4), 255, np.uint8)
    some = data[[3, 45, 90]] & np.packbits(rng.random((3, dim)) < 0.5, axis=1)
    if metric == 7:
        some = data[[3, 45, 90]] | np.packbits(rng.random((3, dim)) < 0.5, axis=1)
    queries = np.vstack([every_row, some])
    for topk in (5, 50, 200):
        (status, result), (_, want) = search_on_both_nodes(proxy, call, name, topk, records(queries))
        assert status.OK(), status
        assert result.shape == want.shape
        expected = oracle.brute_force(metric, queries, data, all_ids, 10**6)  # every match
        for row, got in enumerate(result.ids):
            matches = {i for i, _ in expected[row]}
            assert len(got) == len(want.ids[row]) == min(topk, len(matches))
            assert set(got) <= matches and len(set(got)) == len(got)
            assert result.distances[row] == [0.0] * len(got)
        assert proxy.search(name, topk, records(queries))[1].ids == result.ids, "deterministic order"


def test_annoy_and_the_build_threshold_through_the_proxy(both, clients, cluster):
    """A 4,200-row file (below index_file_size) gets ANNOY, small files stay raw; read-only nodes load
    and search it; SearchByID keeps the width; GetVectorsByID takes 1,000 ids at most."""
    from milvus_grpc import milvus_pb2 as pb
    from tests.support.stubs import milvus_stub

    name, call = both
    proxy, _ = clients
    dim = 16
    assert all(s.OK() for s in call("create_collection", {"collection_name": name, "dimension": dim}))
    rng = np.random.default_rng(12)
    data = rng.random((5000, dim)).astype(np.float32)
    ids = list(range(1, 5001))
    for start, stop in ((0, 4200), (4200, 4400), (4400, 4600), (4600, 4800), (4800, 5000)):
        assert all(r[0].OK() for r in call("insert", name, records(data[start:stop]), ids=ids[start:stop]))
        assert all(s.OK() for s in call("flush", [name]))
    assert proxy.create_index(name, 12, {"n_trees": 0}).code == 5
    assert all(s.OK() for s in call("create_index", name, 12, {"n_trees": 16}))
    status, info = proxy.get_index_info(name)
    assert status.OK() and info["index_type"] == 12 and info["params"] == {"n_trees": 16}
    status, stats = proxy.get_collection_stats(name)
    names = sorted((s["row_count"], s["index_name"]) for s in stats["partitions"][0]["segments"])
    assert names == [(200, "IDMAP")] * 4 + [(4200, "ANNOY")]

    queries = rng.random((10, dim)).astype(np.float32)
    got, want = search_on_both_nodes(proxy, call, name, 10, queries.tolist(), params={"search_k": 2**40})
    same_search(got, want)
    oracle.assert_same_result(got[1].ids, got[1].distances, oracle.brute_force(1, queries, data, ids, 10))
    status, _ = proxy.search(name, 10, queries.tolist(), params={"search_k": 5})
    assert status.code == 5 and status.message == "Invalid search_k value: 5. Valid range is [10, 9223372036854775807]"

    status, _ = proxy.get_entity_by_id(name, ids[:1001])
    assert status.code == 5 and status.message == "Input id array size cannot exceed: 1000"
    # SearchByID (not in pymilvus 0.2.12): one row per id, min(topk, live rows) wide, unknown ids padded
    request = pb.SearchByIDParam(
        collection_name=name,
        id_array=[3, 99999] + ids[:1200],
        topk=5,
        extra_params=[pb.KeyValuePair(key="params", value='{"search_k": 1000}')],
    )
    with milvus_stub(cluster.proxy.address) as via_proxy, milvus_stub(cluster.reference.address) as reference:
        a, b = via_proxy.SearchByID(request, timeout=60), reference.SearchByID(request, timeout=60)
    assert a.status.error_code == b.status.error_code == 0, (a.status, b.status)
    assert a.row_num == b.row_num == 1202 and len(a.ids) == len(b.ids) == 1202 * 5
    assert list(a.ids[:5]) == list(b.ids[:5]) and a.ids[0] == 3
    assert list(a.ids[5:10]) == [-1] * 5

"""Milvus 0.9.1's observable rules through Mishards over two read-only nodes, with pymilvus 0.2.12.

Reply widths for every metric, SUBSTRUCTURE/SUPERSTRUCTURE as match filters, ANNOY, the 4096-row
build threshold, SearchByID widths and the GetVectorsByID cap, each compared with one `single`
node holding the same data. The writable node does not merge small segments here, so the files
stay spread over both read-only nodes (each search checks that both served files). The module
runs once on SQLite meta and once on MariaDB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.proxy.conftest import same_search, start_cluster
from tests.support import oracle


@pytest.fixture(scope="module")
def cluster(module_meta_uri, tmp_path_factory):
    """The shared cluster set-up, but the writable node never merges: tests count files per node."""
    c = start_cluster(module_meta_uri, tmp_path_factory.mktemp("cluster-091"), writable_args=("--merge-after", "-1"))
    yield c
    c.stop()


def records(array):
    return [row.tobytes() for row in array] if array.dtype == np.uint8 else array.tolist()


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
    # 12 segments of 1 row: the ring puts files on both read-only nodes (all on one: p = 2 / 2**12)
    for segment in range(12):
        vector = np.zeros((1, dim // 8), np.uint8) if binary else rng.random((1, dim)).astype(np.float32)
        if binary:
            vector[0, segment // 8] = 1 << (segment % 8)  # distinct rows; a zero query is a substructure of each
        got, want = call("insert", name, records(vector), ids=[segment + 1])
        assert got[0].OK() and want[0].OK()
        assert all(s.OK() for s in call("flush", [name]))
        stored.append(vector)
    queries = np.zeros((2, dim // 8), np.uint8) if binary else rng.random((2, dim)).astype(np.float32)
    if binary:
        queries[1] = 0xFF  # a superstructure of every row; a substructure of none
    (status, result), want = search_on_both_nodes(proxy, call, name, 20, records(queries))
    assert status.OK(), status
    assert result.shape == want[1].shape == (2, 12), "min(topk 20, 12 live rows)"
    if metric in (6, 7):  # match filters: as many matches, each a real one at 0.0
        assert [len(row) for row in result.ids] == [len(row) for row in want[1].ids]
        assert all(d == 0.0 for row in result.distances for d in row)
        assert all(set(row) <= set(range(1, 13)) for row in result.ids)
    else:
        same_search((status, result), want)
    (status, result), want = search_on_both_nodes(proxy, call, name, 3, records(queries))
    assert result.shape == want[1].shape == (2, 3)

    assert all(s.OK() for s in call("delete_entity_by_id", name, list(range(1, 13))))
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
    for batch in range(12):  # 12 files: the ring puts files on both read-only nodes (all on one: p = 2 / 2**12)
        vectors = np.packbits(rng.random((10, dim)) < 0.3, axis=1)
        ids = list(range(1000 - batch * 50, 1000 - batch * 50 - 10, -1))
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

"""The node's exact search kernels against a brute-force oracle written independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milvus_grpc import milvus_pb2 as pb
from milvus_node import engine
from milvus_node.server import records_to_array
from utils.milvus_schema import BINARY_METRICS, MetricType


def oracle_distance(metric: int, q: np.ndarray, d: np.ndarray) -> float | None:
    """One distance the slow, obvious way; None when the stored vector cannot qualify."""
    if metric == MetricType.L2:
        return float(sum((float(a) - float(b)) ** 2 for a, b in zip(q, d, strict=True)))
    if metric == MetricType.IP:
        return float(sum(float(a) * float(b) for a, b in zip(q, d, strict=True)))
    qi = int.from_bytes(q.tobytes(), "big")
    di = int.from_bytes(d.tobytes(), "big")
    both, union = bin(qi & di).count("1"), bin(qi | di).count("1")
    nq, nd = bin(qi).count("1"), bin(di).count("1")
    if metric == MetricType.HAMMING:
        return float(bin(qi ^ di).count("1"))
    if metric == MetricType.JACCARD:
        return 1.0 - (both / union if union else 1.0)
    if metric == MetricType.TANIMOTO:
        sim = both / union if union else 1.0
        return None if sim == 0 else -math.log2(sim)  # infinite: faiss never ranks it
    if metric == MetricType.SUBSTRUCTURE:  # a match filter: 0.0 for a match (corrected from ratio distances)
        return None if both != nq else 0.0
    if metric == MetricType.SUPERSTRUCTURE:
        return None if both != nd else 0.0
    raise AssertionError(metric)


def oracle_search(metric, queries, vectors, ids, deleted, topk):
    """Best `topk` by distance, ties by id; for a match filter the first `topk` matches in row order."""
    rows = []
    for q in queries:
        hits = []
        for position, (v, i, gone) in enumerate(zip(vectors, ids, deleted, strict=True)):
            dist = oracle_distance(metric, q, v)
            if gone or dist is None:
                continue
            if metric in (MetricType.SUBSTRUCTURE, MetricType.SUPERSTRUCTURE):
                hits.append((position, int(i), dist))
            else:
                hits.append((-dist if metric == MetricType.IP else dist, int(i), dist))
        hits.sort()
        rows.append([(i, dist) for _, i, dist in hits[:topk]])
    return rows


def check(metric, queries, vectors, ids, deleted, topk):
    got_ids, got_dist = engine.search_block(metric, queries, vectors, ids, deleted, topk)
    want = oracle_search(metric, queries, vectors, ids, deleted, topk)
    assert got_ids.shape == (len(queries), topk)
    for row, expected in enumerate(want):
        assert got_ids[row, : len(expected)].tolist() == [i for i, _ in expected]
        assert (got_ids[row, len(expected) :] == -1).all()
        np.testing.assert_allclose(got_dist[row, : len(expected)], [d for _, d in expected], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", [MetricType.L2, MetricType.IP])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_float_metrics_match_oracle(metric, data):
    n = data.draw(st.integers(0, 40))
    dim = data.draw(st.integers(1, 6))
    nq = data.draw(st.integers(1, 4))
    topk = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # small integers make exact ties common, so the id tie-break is exercised
    vectors = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    queries = rng.integers(-3, 4, size=(nq, dim)).astype(np.float32)
    ids = rng.permutation(10 * n + 1)[:n].astype(np.int64)
    deleted = rng.random(n) < 0.2
    check(metric, queries, vectors, ids, deleted, topk)


@pytest.mark.parametrize("metric", sorted(BINARY_METRICS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_binary_metrics_match_oracle(metric, data):
    n = data.draw(st.integers(0, 40))
    width = data.draw(st.integers(1, 3))
    nq = data.draw(st.integers(1, 4))
    topk = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    density = data.draw(st.sampled_from([0.1, 0.5, 0.9]))
    vectors = np.packbits(rng.random((n, width * 8)) < density, axis=1)
    queries = np.packbits(rng.random((nq, width * 8)) < density, axis=1)
    ids = rng.permutation(10 * n + 1)[:n].astype(np.int64)  # storage order is not id order
    deleted = rng.random(n) < 0.2
    check(metric, queries, vectors, ids, deleted, topk)


@pytest.mark.parametrize("metric", [MetricType.SUBSTRUCTURE, MetricType.SUPERSTRUCTURE])
def test_match_filters_keep_storage_order_across_segments(metric):
    rng = np.random.default_rng(metric)
    vectors = np.packbits(rng.random((60, 16)) < 0.3, axis=1)
    ids = rng.permutation(1000)[:60].astype(np.int64)
    query = np.zeros((1, 2), np.uint8) if metric == MetricType.SUBSTRUCTURE else np.full((1, 2), 255, np.uint8)
    parts = [engine.search_block(metric, query, vectors[s], ids[s], None, 25) for s in (slice(0, 20), slice(20, 60))]
    merged_ids, merged_dist = engine.merge_topk(parts, 1, 25, metric)
    assert merged_ids[0].tolist() == ids[:25].tolist(), "every row matches: the first 25 stored"
    assert (merged_dist == 0.0).all()


@pytest.mark.parametrize("metric", [MetricType.L2, MetricType.IP])
@pytest.mark.parametrize("duplicates", [False, True])
def test_large_segments_take_the_preselection_path_and_stay_exact(metric, duplicates):
    rng = np.random.default_rng(11)
    vectors = rng.random((3000, 32)).astype(np.float32)
    if duplicates:  # exact ties at the candidate boundary must still be settled by id
        vectors[1000:1400] = vectors[5]
    ids = rng.permutation(100_000)[:3000].astype(np.int64)
    deleted = rng.random(3000) < 0.1
    queries = np.vstack([rng.random((4, 32)).astype(np.float32), vectors[5:6]])
    for topk in (1, 10, 50):
        got_ids, got_dist = engine.search_block(metric, queries, vectors, ids, deleted, topk)
        want = oracle_search(metric, queries, vectors.astype(np.float64), ids, deleted, topk)
        for row, expected in enumerate(want):
            assert got_ids[row].tolist() == [i for i, _ in expected]
            np.testing.assert_allclose(got_dist[row], [d for _, d in expected], rtol=1e-9, atol=1e-9)


def test_merge_of_segments_equals_one_search():
    rng = np.random.default_rng(3)
    vectors = rng.random((300, 8)).astype(np.float32)
    ids = np.arange(300, dtype=np.int64)
    queries = rng.random((5, 8)).astype(np.float32)
    whole = engine.search_block(MetricType.L2, queries, vectors, ids, None, 10)
    parts = [
        engine.search_block(MetricType.L2, queries, vectors[s], ids[s], None, 10)
        for s in (slice(0, 100), slice(100, 250), slice(250, 300))
    ]
    merged = engine.merge_topk(parts, 5, 10, MetricType.L2)
    assert (merged[0] == whole[0]).all()
    np.testing.assert_allclose(merged[1], whole[1])


def test_padding_uses_the_worst_distance():
    ids, dist = engine.search_block(
        MetricType.IP, np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), np.array([5]), None, 3
    )
    assert ids.tolist() == [[5, -1, -1]]
    assert dist[0, 1] == -engine.FLT_MAX


def test_records_to_array_reads_float_and_binary_records():
    x = np.random.default_rng(1).random((7, 130)).astype(np.float32)
    records = [pb.RowRecord(float_data=row) for row in x.tolist()]
    np.testing.assert_array_equal(records_to_array(records, binary=False), x)
    raw = [bytes([i, 255 - i]) for i in range(5)]
    got = records_to_array([pb.RowRecord(binary_data=b) for b in raw], binary=True)
    assert got.tobytes() == b"".join(raw)

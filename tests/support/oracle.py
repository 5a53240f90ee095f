"""A brute-force search oracle: every distance in float64 the direct way, ties by ascending id.

SUBSTRUCTURE and SUPERSTRUCTURE are match filters (Milvus 0.9.1): every match at 0.0, the first
topk matches in the order the data is given (storage order), not by id."""

from __future__ import annotations

import numpy as np

from utils import milvus_schema
from utils.milvus_schema import MetricType

BINARY_METRICS = sorted(milvus_schema.BINARY_METRICS)


def _distances(metric: int, q: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Distances from one query to every row; NaN where the row cannot qualify."""
    if metric == MetricType.L2:
        return ((data.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1)
    if metric == MetricType.IP:
        return (data.astype(np.float64) * q.astype(np.float64)).sum(1)
    qb = np.unpackbits(q).astype(bool)
    db = np.unpackbits(data, axis=1).astype(bool)
    both = (db & qb).sum(1).astype(np.float64)
    union = (db | qb).sum(1).astype(np.float64)
    nq, nd = float(qb.sum()), db.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(union > 0, both / union, 1.0)
        if metric == MetricType.HAMMING:
            return (db ^ qb).sum(1).astype(np.float64)
        if metric == MetricType.JACCARD:
            return 1.0 - sim
        if metric == MetricType.TANIMOTO:
            return np.where(sim > 0, -np.log2(sim), np.nan)
        if metric == MetricType.SUBSTRUCTURE:  # every set bit of the query is set in the row
            return np.where(both == nq, 0.0, np.nan)
        if metric == MetricType.SUPERSTRUCTURE:  # every set bit of the row is set in the query
            return np.where(both == nd, 0.0, np.nan)
    raise ValueError(metric)


def brute_force(metric: int, queries, data, ids, topk: int) -> list[list[tuple[int, float]]]:
    """Per query the best `topk` (id, distance) pairs; fewer when fewer rows qualify. For a match
    filter, the first `topk` matches in the order of `data`."""
    data = np.asarray(data)
    ids = np.asarray(ids, dtype=np.int64)
    out = []
    for q in np.asarray(queries):
        dist = _distances(metric, q, data) if len(data) else np.zeros(0)
        ok = ~np.isnan(dist)
        key = -dist[ok] if metric == MetricType.IP else dist[ok]
        tiebreak = np.arange(ok.sum()) if metric in milvus_schema.MATCH_FILTER_METRICS else ids[ok]
        order = np.lexsort((tiebreak, key))[:topk]
        out.append([(int(ids[ok][i]), float(dist[ok][i])) for i in order])
    return out


def assert_same_result(got_ids, got_distances, expected, atol: float = 1e-4) -> None:
    """Ids equal row by row; distances within `atol` (relative for large values)."""
    assert len(got_ids) == len(expected), (len(got_ids), len(expected))
    for row, (ids, dists, want) in enumerate(zip(got_ids, got_distances, expected, strict=True)):
        assert list(ids) == [i for i, _ in want], f"row {row}: ids {list(ids)} != {[i for i, _ in want]}"
        np.testing.assert_allclose(dists, [d for _, d in want], rtol=1e-5, atol=atol, err_msg=f"row {row}")

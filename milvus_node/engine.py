"""Exact (FLAT) search kernels: distances for every Milvus metric and a deterministic top-k.

Pure functions on numpy arrays, no I/O. Distances are what Milvus returns: squared L2, inner
product, and the binary metrics on bit sets. Float distances are computed in float64 and
returned as float32, so that ranking does not depend on summation order; ties are broken by
ascending id, so results are reproducible and a brute-force oracle can compare them exactly.
"""

from __future__ import annotations

import numpy as np

from utils.milvus_schema import MetricType, is_descending, is_match_filter

FLT_MAX = float(np.finfo(np.float32).max)

# Elements of the (queries x rows) distance block computed at once; bounds memory per search.
_BLOCK_ELEMENTS = 1 << 22

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.float64)


def pad_distance(metric: int) -> float:
    """What faiss leaves beside a -1 id: the worst possible value for the metric."""
    return -FLT_MAX if is_descending(metric) else FLT_MAX


def distances(metric: int, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Distance matrix (nq x n) in float64; +inf (or -inf for IP) marks rows that cannot qualify."""
    if metric == MetricType.L2:
        q = queries.astype(np.float64)
        v = vectors.astype(np.float64)
        d = (q * q).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2.0 * (q @ v.T)
        return np.maximum(d, 0.0)
    if metric == MetricType.IP:
        return queries.astype(np.float64) @ vectors.astype(np.float64).T
    q_bits = np.unpackbits(queries, axis=1).astype(np.float64)
    v_bits = np.unpackbits(vectors, axis=1).astype(np.float64)
    both = q_bits @ v_bits.T
    q_count = _POPCOUNT[queries].sum(1)[:, None]
    v_count = _POPCOUNT[vectors].sum(1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == MetricType.HAMMING:
            return q_count + v_count - 2.0 * both
        union = q_count + v_count - both
        similarity = np.where(union > 0, both / np.where(union > 0, union, 1.0), 1.0)
        if metric == MetricType.JACCARD:
            return 1.0 - similarity
        if metric == MetricType.TANIMOTO:
            return -np.log2(similarity)
        # Match filters as 0.9.1's binary flat search reports them: 0.0 for a match, nothing otherwise.
        if metric == MetricType.SUBSTRUCTURE:
            return np.where(both == q_count, 0.0, np.inf)
        if metric == MetricType.SUPERSTRUCTURE:
            return np.where(both == v_count, 0.0, np.inf)
    raise ValueError(f"unknown metric type {metric}")


def select_topk(dist: np.ndarray, ids: np.ndarray, topk: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `topk` per row of `dist` (nq x m) with ids (nq x m or m,), ties by ascending id.

    Entries that cannot qualify (inf for ascending, -inf for IP, id -1) are dropped; rows with fewer
    hits are padded with id -1 and the metric's worst distance. Returns (ids, float64 distances),
    both nq x topk; callers cast distances to float32 only for the reply, so merging segments
    ranks on exact values.
    """
    nq, m = dist.shape
    ids = np.broadcast_to(ids, dist.shape)
    out_ids = np.full((nq, topk), -1, dtype=np.int64)
    out_dist = np.full((nq, topk), pad_distance(metric), dtype=np.float64)
    if nq == 0 or m == 0:
        return out_ids, out_dist
    key = -dist if is_descending(metric) else dist
    key = np.where(ids < 0, np.inf, key)
    if m > topk:
        # Everything strictly better than the k-th key is in; at the k-th key ties are settled by id.
        kth = np.partition(key, topk - 1, axis=1)[:, topk - 1 : topk]
        rows, cols = np.nonzero(key <= kth)
    else:
        rows, cols = np.nonzero(np.ones_like(key, dtype=bool))
    cand_key = key[rows, cols]
    cand_ids = ids[rows, cols]
    finite = np.isfinite(cand_key)
    rows, cols, cand_key, cand_ids = rows[finite], cols[finite], cand_key[finite], cand_ids[finite]
    order = np.lexsort((cand_ids, cand_key, rows))
    rows, cols, cand_ids = rows[order], cols[order], cand_ids[order]
    row_start = np.searchsorted(rows, np.arange(nq))
    rank = np.arange(rows.size) - row_start[rows]
    keep = rank < topk
    rows, rank, cols, cand_ids = rows[keep], rank[keep], cols[keep], cand_ids[keep]
    out_ids[rows, rank] = cand_ids
    out_dist[rows, rank] = dist[rows, cols]
    return out_ids, out_dist


def first_matches(dist: np.ndarray, ids: np.ndarray, topk: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `topk` qualifying entries of each row of `dist` (nq x m) in column order: how a
    match filter keeps hits (storage order, not rank). Non-qualifying entries are +inf or id -1."""
    nq, m = dist.shape
    ids = np.broadcast_to(ids, dist.shape)
    out_ids = np.full((nq, topk), -1, dtype=np.int64)
    out_dist = np.full((nq, topk), pad_distance(metric), dtype=np.float64)
    if nq == 0 or m == 0:
        return out_ids, out_dist
    hit = np.isfinite(dist) & (ids >= 0)
    rank = np.cumsum(hit, axis=1) - 1  # position among the row's matches
    keep = hit & (rank < topk)
    rows, cols = np.nonzero(keep)
    out_ids[rows, rank[rows, cols]] = ids[rows, cols]
    out_dist[rows, rank[rows, cols]] = dist[rows, cols]
    return out_ids, out_dist


def select(dist: np.ndarray, ids: np.ndarray, topk: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `topk` by distance, or for a match filter the first `topk` matches in column order."""
    if is_match_filter(metric):
        return first_matches(dist, ids, topk, metric)
    return select_topk(dist, ids, topk, metric)


def search_block(
    metric: int,
    queries: np.ndarray,
    vectors: np.ndarray,
    row_ids: np.ndarray,
    excluded: np.ndarray | None,
    topk: int,
    norms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` against one segment; `excluded` marks deleted rows.

    Float metrics on large segments pre-select candidates with one float32 BLAS product and rank
    only those exactly in float64; everything else is ranked exactly over the whole segment.
    (faiss' flat k-NN as the pre-selection was measured no faster here: the scan is memory-bound
    once a collection outgrows the CPU cache, and it lost at nq = 100.)
    """
    if excluded is not None and excluded.any():
        row_ids = np.where(excluded, -1, row_ids)
    nq, n = queries.shape[0], vectors.shape[0]
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    preselect = metric in (MetricType.L2, MetricType.IP) and n > _PRESELECT_FACTOR * topk + _PRESELECT_EXTRA
    if preselect:
        step = min(step, 64)  # bounds the (queries x candidates x dim) float64 block
    parts_ids, parts_dist = [], []
    for start in range(0, nq, step):
        block = queries[start : start + step]
        if preselect:
            i, d = _search_preselected(metric, block, vectors, row_ids, topk, norms)
        else:
            i, d = select(distances(metric, block, vectors), row_ids, topk, metric)
        parts_ids.append(i)
        parts_dist.append(d)
    if not parts_ids:
        return select_topk(np.zeros((0, 0)), row_ids, topk, metric)
    return np.concatenate(parts_ids), np.concatenate(parts_dist)


_PRESELECT_FACTOR = 4
_PRESELECT_EXTRA = 64


def exact_distances(metric: int, queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Exact float64 L2/IP distances of each query to its candidate rows (nq x c positions)."""
    chosen = vectors[np.maximum(candidates, 0)].astype(np.float64)  # (nq, c, dim)
    q = queries.astype(np.float64)[:, None, :]
    if metric == MetricType.L2:
        chosen -= q
        return np.einsum("ijk,ijk->ij", chosen, chosen)
    return np.einsum("ijk,ijk->ij", chosen, np.broadcast_to(q, chosen.shape))


def _search_preselected(
    metric: int, queries: np.ndarray, vectors: np.ndarray, row_ids: np.ndarray, topk: int, norms: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates by float32 score (topk + 16 of them), then exact float64 ranking among them.

    float32 rounding (~1e-5 relative) can only reorder rows whose distances nearly tie, and the
    candidate margin keeps all of those. A row whose candidate boundary is an exact tie shared
    with more rows than were kept (duplicate vectors) is ranked exactly over the whole segment.
    """
    scores = queries.astype(np.float32, copy=False) @ vectors.T
    if metric == MetricType.L2:
        if norms is None:
            norms = np.einsum("ij,ij->i", vectors, vectors)
        approx = norms[None, :] - 2.0 * scores
    else:
        approx = -scores
    approx[:, row_ids < 0] = np.inf
    keep = min(vectors.shape[0], topk + 16)
    candidates = np.argpartition(approx, keep - 1, axis=1)[:, :keep]
    boundary = np.take_along_axis(approx, candidates, axis=1).max(axis=1)
    tied = (approx <= boundary[:, None]).sum(axis=1) > keep
    ids, dist = select_topk(exact_distances(metric, queries, vectors, candidates), row_ids[candidates], topk, metric)
    if tied.any():
        rows = np.flatnonzero(tied)
        ids[rows], dist[rows] = select_topk(distances(metric, queries[rows], vectors), row_ids, topk, metric)
    return ids, dist


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], nq: int, topk: int, metric: int
) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-segment top-k lists (ids are unique across segments of one collection).

    For a match filter the parts are in storage order and their matches are kept in that order."""
    if not parts:
        return select_topk(np.zeros((nq, 0)), np.zeros((nq, 0), dtype=np.int64), topk, metric)
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts], axis=1)
    dist = np.concatenate([p[1] for p in parts], axis=1)
    dist = np.where(ids < 0, -np.inf if is_descending(metric) else np.inf, dist)
    return select(dist, ids, topk, metric)

"""The top-k merge against a concatenate-sort-dedupe oracle, on every internal path.

The oracle is pure Python and written the other way round from the small path (sort everything,
then keep each id's first appearance), so a shared mistake is unlikely. Every test runs twice:
with the compiled k-way merge (skipped where it was not built) and with the numpy path that
replaces it then.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mishards.core import merge
from mishards.core.merge import FLT_MAX, merge_topk
from utils.errors import IllegalTopK, UnexpectedError
from utils.milvus_schema import is_descending, is_match_filter


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def kernel(request):
    """The merge kernel under test: the compiled one, or the numpy path (the compiled one hidden)."""
    if request.param == "compiled":
        if merge._kernels is None:
            pytest.skip("the compiled merge kernel (mishards/core/_topk.c) was not built")
        yield request.param
        return
    with mock.patch.object(merge, "_kernels", None):
        yield request.param


def oracle(node_results, nq: int, topk: int, descending: bool):
    """Best `topk` distinct ids per row, ties by ascending id, width min(topk, sum of widths);
    no rows at all when that width is 0 (a server's row_num = 0)."""
    nonempty = [(np.asarray(ids), np.asarray(dists)) for ids, dists in node_results if np.asarray(ids).size]
    width = min(topk, sum(ids.shape[1] for ids, _ in nonempty))
    if width == 0:
        return np.empty((0, 0), np.int64), np.empty((0, 0), np.float32)
    padding = (-1, -FLT_MAX if descending else FLT_MAX)
    rows = []
    for row in range(nq):
        candidates = [
            (int(vector_id), float(distance))
            for ids, dists in nonempty
            for vector_id, distance in zip(ids[row], dists[row], strict=True)
            if vector_id != -1
        ]

        def rank(candidate):
            vector_id, distance = candidate
            if math.isnan(distance):
                return (1, 0.0, vector_id)
            return (0, -distance if descending else distance, vector_id)

        kept, seen = [], set()
        for vector_id, distance in sorted(candidates, key=rank):
            if vector_id not in seen:
                seen.add(vector_id)
                kept.append((vector_id, distance))
        rows.append((kept + [padding] * width)[:width])
    ids = np.array([[vector_id for vector_id, _ in row] for row in rows], dtype=np.int64).reshape(nq, width)
    dists = np.array([[distance for _, distance in row] for row in rows], dtype=np.float32).reshape(nq, width)
    return ids, dists


def assert_same(actual, expected):
    (ids, dists), (expected_ids, expected_dists) = actual, expected
    assert ids.dtype == np.int64 and dists.dtype == np.float32
    assert ids.shape == expected_ids.shape and dists.shape == expected_dists.shape
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(dists, expected_dists)  # NaN == NaN here; -0.0 == 0.0


@st.composite
def merge_inputs(draw, max_rows=4, max_width=12):
    """Random nodes (0..8) of random widths, with padding, repeated ids, ties, NaN and +-0.0."""
    nq = draw(st.integers(1, max_rows))
    few_ids = draw(st.booleans())  # few distinct ids -> many duplicates across nodes
    id_values = st.integers(-1, 12) if few_ids else st.one_of(st.just(-1), st.integers(0, 2**63 - 1))
    few_distances = draw(st.booleans())  # few distinct distances -> many ties
    distance_values = (
        st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, float("inf")])
        if few_distances
        else st.floats(width=32, allow_nan=draw(st.booleans()))
    )
    node_results = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 9)) == 0:  # a node that answered row_num = 0
            node_results.append((np.empty((0, 0), np.int64), np.empty((0, 0), np.float32)))
            continue
        width = draw(st.integers(0, max_width))
        ids = np.array(draw(st.lists(id_values, min_size=nq * width, max_size=nq * width)), np.int64)
        dists = np.array(draw(st.lists(distance_values, min_size=nq * width, max_size=nq * width)), np.float32)
        node_results.append((ids.reshape(nq, width), dists.reshape(nq, width)))
    return node_results, nq, draw(st.integers(1, 16)), draw(st.booleans())


PATHS = {  # (SMALL_MERGE_CANDIDATES, PREFIX_MIN_CANDIDATES)
    "dispatch": (merge.SMALL_MERGE_CANDIDATES, merge.PREFIX_MIN_CANDIDATES),
    "small": (10**9, 10**9),  # every input takes the pure-Python path
    "vectorised": (-1, 10**9),  # every input takes the numpy path (fast head + exact rows)
    "prefixes": (-1, 0),  # every input first merges node prefixes, then redoes the rows it must
}


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(case=merge_inputs(), best_first=st.booleans())
def test_merge_equals_the_oracle(path, case, best_first):
    """Node rows as drawn, or best first as nodes send them (ties, padding and NaN included)."""
    node_results, nq, topk, descending = case
    if merge._kernels is not None and path != "dispatch":
        pytest.skip("the compiled kernel merges every array input: the paths are the numpy ones")
    if best_first:
        node_results = _best_first(node_results, descending)
    small, prefix = PATHS[path]
    with (
        mock.patch.object(merge, "SMALL_MERGE_CANDIDATES", small),
        mock.patch.object(merge, "PREFIX_MIN_CANDIDATES", prefix),
    ):
        actual = merge_topk(node_results, nq, topk, descending)
    assert_same(actual, oracle(node_results, nq, topk, descending))


def as_lists(node_results):
    """Node results as decode_topk_hits gives small replies: flat row-major Python lists."""
    return [(np.asarray(ids).ravel().tolist(), np.asarray(dists).ravel().tolist()) for ids, dists in node_results]


@pytest.mark.parametrize("small_lists", [True, False], ids=["python", "converted to numpy"])
@settings(max_examples=150, deadline=None)
@given(case=merge_inputs())
def test_list_replies_merge_like_the_oracle(small_lists, case):
    """Lists in, flat lists out (nq x K values), equal to the oracle; or arrays past the limit
    (the numpy path's: the compiled kernel reads lists of any length and answers lists)."""
    node_results, nq, topk, descending = case
    limit = 10**9 if small_lists else -1
    with (
        mock.patch.object(merge, "SMALL_LIST_CANDIDATES", limit),
        mock.patch.object(merge, "ONE_QUERY_LIST_CANDIDATES", limit),
    ):
        ids, dists = merge_topk(as_lists(node_results), nq, topk, descending)
    expected_ids, expected_dists = oracle(node_results, nq, topk, descending)
    if not node_results or (not small_lists and merge._kernels is None):
        assert_same((ids, dists), (expected_ids, expected_dists))
        return
    assert type(ids) is list and type(dists) is list
    assert ids == expected_ids.ravel().tolist()
    np.testing.assert_array_equal(np.array(dists, np.float32), expected_dists.ravel())


@settings(max_examples=150, deadline=None)
@given(case=merge_inputs(max_rows=1), data=st.data())
def test_one_query_of_list_replies_is_exact(case, data):
    """The one-row fast path (and its hand-off to the general path) with ties, -0.0, NaN, repeats."""
    node_results, _, topk, descending = case
    lists = as_lists(node_results)
    if data.draw(st.booleans()):  # mixed: some nodes as arrays
        lists = [pair if index % 2 else node_results[index] for index, pair in enumerate(lists)]
    ids, dists = merge_topk(lists, 1, topk, descending)
    expected_ids, expected_dists = oracle(node_results, 1, topk, descending)
    assert np.array_equal(np.asarray(ids, np.int64).ravel(), expected_ids.ravel())
    np.testing.assert_array_equal(np.asarray(dists, np.float32).ravel(), expected_dists.ravel())


@settings(max_examples=60, deadline=None)
@given(case=merge_inputs(max_rows=3))
def test_match_filter_lists_equal_the_numpy_merge(case):
    node_results, nq, topk, _ = case
    expected_ids, expected_dists = merge_topk(node_results, nq, topk, False, match_filter=True)
    with mock.patch.object(merge, "SMALL_LIST_CANDIDATES", 10**9):
        ids, dists = merge_topk(as_lists(node_results), nq, topk, False, match_filter=True)
    assert list(np.asarray(ids).ravel()) == expected_ids.ravel().tolist()
    np.testing.assert_array_equal(np.asarray(dists, np.float32).ravel(), expected_dists.ravel())


@pytest.mark.parametrize("descending", [False, True])
def test_prefix_merge_redoes_the_rows_a_left_out_candidate_changes(descending):
    """One node holds all of a row's best hits, past its prefix: that row must be merged whole."""
    rng = np.random.default_rng(11)
    nq, topk, nodes = 20, 100, 4
    sign = -1.0 if descending else 1.0
    node_results = []
    for node in range(nodes):
        ids = rng.permutation(nq * topk).reshape(nq, topk) * nodes + node
        dists = np.sort(rng.random((nq, topk)).astype(np.float32), axis=1) * np.float32(sign)
        if node == 0:
            dists[3] = np.linspace(-1.0, -0.5, topk, dtype=np.float32) * np.float32(sign)  # row 3: all best
        node_results.append((ids, dists))

    ids, dists = merge_topk(node_results, nq, topk, descending)

    assert_same((ids, dists), oracle(node_results, nq, topk, descending))
    assert (ids[3] % nodes == 0).all()


@settings(max_examples=40, deadline=None)
@given(case=merge_inputs(max_rows=3), data=st.data())
def test_node_order_does_not_change_the_reply(case, data):
    node_results, nq, topk, descending = case
    shuffled = data.draw(st.permutations(node_results))
    assert_same(merge_topk(shuffled, nq, topk, descending), merge_topk(node_results, nq, topk, descending))


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_large_merges_equal_the_oracle(descending, ties):
    """Sizes where the vectorised path partitions rows; realistic sorted node rows."""
    rng = np.random.default_rng(7 + ties + 2 * descending)
    nq, topk, node_results = 30, 50, []
    for width in (50, 50, 37, 0, 12):
        ids = rng.integers(0, 400, (nq, width))  # overlapping id ranges: duplicates across nodes
        dists = rng.integers(0, 30, (nq, width)) if ties else rng.standard_normal((nq, width))
        dists = np.sort(dists.astype(np.float32), axis=1)
        if descending:
            dists = dists[:, ::-1]
        ids[:, width - width // 5 :] = -1  # padded tails
        node_results.append((ids, dists))

    assert_same(merge_topk(node_results, nq, topk, descending), oracle(node_results, nq, topk, descending))


def test_inner_product_keeps_the_largest_distances():
    """Defect: v0.9.1 merged IP results ascending and returned the worst hits."""
    node_a = (np.array([[1, 2]]), np.array([[0.9, 0.1]], np.float32))
    node_b = (np.array([[3, 4]]), np.array([[0.95, 0.5]], np.float32))

    ids, dists = merge_topk([node_a, node_b], nq=1, topk=3, descending=is_descending(2))

    assert ids.tolist() == [[3, 1, 4]]
    np.testing.assert_allclose(dists, [[0.95, 0.9, 0.5]])


def test_nodes_with_different_widths_fill_topk():
    """Defect: the original took k from the newer batch and raised IndexError or truncated rows."""
    short = (np.array([[10], [20]]), np.array([[5.0], [1.0]], np.float32))
    long = (np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]], np.float32))

    ids, _ = merge_topk([short, long], nq=2, topk=4, descending=False)

    assert ids.tolist() == [[1, 2, 3, 10], [20, 4, 5, 6]]


def test_padding_from_several_nodes_never_displaces_hits():
    """Defect: -1 sentinels took part in the sort; duplicated ones could fill the tail."""
    node_a = (np.array([[7, -1, -1]]), np.array([[2.0, -5.0, -5.0]], np.float32))
    node_b = (np.array([[8, -1, -1]]), np.array([[3.0, -9.0, FLT_MAX]], np.float32))

    ids, dists = merge_topk([node_a, node_b], nq=1, topk=3, descending=False)

    assert ids.tolist() == [[7, 8, -1]]
    assert dists[0, 2] == np.float32(FLT_MAX)


def test_an_id_from_two_nodes_is_kept_once_with_its_best_distance():
    node_a = (np.array([[5, 6]]), np.array([[0.3, 0.4]], np.float32))
    node_b = (np.array([[6, 5]]), np.array([[0.1, 0.35]], np.float32))

    ids, dists = merge_topk([node_a, node_b], nq=1, topk=4, descending=False)

    assert ids.tolist() == [[6, 5, -1, -1]]
    np.testing.assert_allclose(dists[0, :2], [0.1, 0.3])


def test_ties_go_to_the_smaller_id_across_the_cut():
    node_a = (np.array([[30, 10]]), np.array([[1.0, 1.0]], np.float32))
    node_b = (np.array([[20, 5]]), np.array([[1.0, 2.0]], np.float32))

    ids, _ = merge_topk([node_a, node_b], nq=1, topk=2, descending=False)

    assert ids.tolist() == [[10, 20]]


def test_width_is_the_one_a_single_server_would_send():
    """min(topk, sum of node widths); rows with no hit at all stay as -1 rows, not absent rows."""
    no_hits = (np.full((3, 2), -1), np.full((3, 2), FLT_MAX, np.float32))

    ids, dists = merge_topk([no_hits, no_hits], nq=3, topk=10, descending=False)

    assert ids.shape == dists.shape == (3, 4)
    assert (ids == -1).all()


def test_no_answers_give_no_rows_as_one_server_does():
    """Corrected: nodes that searched no live row answer row_num = 0, and so does one server over
    all their files; the merge used to give (nq, 0), which encodes as row_num = nq."""
    ids, dists = merge_topk([], nq=2, topk=5, descending=True)
    assert ids.shape == dists.shape == (0, 0)

    empty = (np.empty((0, 0), np.int64), np.empty((0, 0), np.float32))
    assert merge_topk([empty, empty], nq=2, topk=5, descending=False)[0].shape == (0, 0)


def test_a_node_answering_for_other_query_rows_is_an_error():
    """Different row counts would misalign rows; refuse instead."""
    good = (np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32))
    bad = (np.zeros((3, 3), np.int64), np.zeros((3, 3), np.float32))

    with pytest.raises(UnexpectedError):
        merge_topk([good, bad], nq=2, topk=3, descending=False)
    with pytest.raises(UnexpectedError):
        merge_topk([(np.zeros((2, 3), np.int64), np.zeros((2, 2), np.float32))], nq=2, topk=3, descending=False)


def test_topk_below_one_is_refused():
    with pytest.raises(IllegalTopK):
        merge_topk([], nq=1, topk=0, descending=False)


def test_descending_only_for_inner_product():
    assert [is_descending(metric) for metric in range(1, 8)] == [False, True, False, False, False, False, False]


def test_match_filter_keeps_reply_order_then_id_and_zero_distances():
    """SUBSTRUCTURE/SUPERSTRUCTURE: no distance to rank by; column in the node's row, then id."""
    node_a = (np.array([[50, 9, -1]]), np.zeros((1, 3), np.float32))
    node_b = (np.array([[7, 50]]), np.zeros((1, 2), np.float32))

    for nodes in ([node_a, node_b], [node_b, node_a]):
        ids, dists = merge_topk(nodes, nq=1, topk=10, descending=False, match_filter=True)
        assert ids.tolist() == [[7, 50, 9, -1, -1]]  # 50 twice (columns 0 and 1): kept once, at column 0
        assert dists[0, :3].tolist() == [0.0, 0.0, 0.0] and dists[0, 3] == np.float32(FLT_MAX)

    ids, _ = merge_topk([node_a, node_b], nq=1, topk=2, descending=False, match_filter=True)
    assert ids.tolist() == [[7, 50]]
    assert is_match_filter(6) and is_match_filter(7) and not is_match_filter(3)


# ------------------------------------------------------------- the proxy's width = one node's width
def _node_reply(metric: int, queries: np.ndarray, files: list, topk: int):
    """What one compact node answers for `files` [(vectors, ids, deleted)], with its own kernels."""
    from milvus_node import engine

    live = sum(int((~deleted).sum()) for _, _, deleted in files)
    width = min(topk, live)
    if width == 0:
        return np.empty((0, 0), np.int64), np.empty((0, 0), np.float32)
    parts = [engine.search_block(metric, queries, v, i, d, topk) for v, i, d in files]
    ids, dists = engine.merge_topk(parts, queries.shape[0], topk, metric)
    return ids[:, :width], dists[:, :width].astype(np.float32)


@st.composite
def spread_searches(draw):
    """Files of 0..topk+2 rows (some all deleted) spread over 1..3 nodes, any metric."""
    metric = draw(st.integers(1, 7))
    binary = metric > 2
    topk = draw(st.integers(1, 8))
    nq = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dim = 16 if binary else 4
    next_id, files = 0, []
    for _ in range(draw(st.integers(1, 5))):
        rows = draw(st.integers(0, topk + 2))
        if binary:
            vectors = np.packbits(rng.random((rows, dim)) < (0.3 if metric > 5 else 0.5), axis=1)
        else:
            vectors = rng.integers(0, 3, (rows, dim)).astype(np.float32)  # small ints: many ties
        deleted = rng.random(rows) < draw(st.sampled_from([0.0, 0.5, 1.0]))
        files.append((vectors, np.arange(next_id, next_id + rows, dtype=np.int64), deleted))
        next_id += rows
    node_of_file = [draw(st.integers(0, 2)) for _ in files]
    queries = files[0][0][:1] if files[0][0].shape[0] and draw(st.booleans()) else None
    if queries is None:
        queries = np.packbits(rng.random((nq, dim)) < 0.2, axis=1) if binary else rng.random((nq, dim), np.float32)
    return metric, topk, queries, files, node_of_file


@settings(max_examples=120, deadline=None)
@given(case=spread_searches())
def test_merged_width_equals_one_node_over_all_files(case):
    """Per-node replies (widths 0..topk, padding, every metric) merged by the proxy have the shape
    one node over the union returns; ranked metrics give its exact reply, match filters its count
    of matches, each a real match at 0.0."""
    metric, topk, queries, files, node_of_file = case
    nq = queries.shape[0]
    replies = [
        _node_reply(metric, queries, [f for f, n in zip(files, node_of_file, strict=True) if n == node], topk)
        for node in sorted(set(node_of_file))
    ]
    single_ids, single_dists = _node_reply(metric, queries, files, topk)
    ids, dists = merge_topk(replies, nq, topk, is_descending(metric), match_filter=is_match_filter(metric))

    assert ids.shape == dists.shape == single_ids.shape
    if is_match_filter(metric):
        np.testing.assert_array_equal((ids != -1).sum(axis=1), (single_ids != -1).sum(axis=1))
        from milvus_node import engine

        vectors = np.concatenate([v[~d] for v, _, d in files])
        live_ids = np.concatenate([i[~d] for _, i, d in files])
        matches = np.isfinite(engine.distances(metric, queries, vectors))
        assert (dists[ids != -1] == 0.0).all()
        for row, got in enumerate(ids):  # every reported id is a match of its query, reported once
            got = got[got != -1]
            assert np.isin(got, live_ids[matches[row]]).all() and np.unique(got).size == got.size
    else:
        np.testing.assert_array_equal(ids, single_ids)
        np.testing.assert_allclose(dists, single_dists, rtol=1e-6)


def _best_first(node_results, descending: bool):
    """The node results with each row ordered best first (as faiss answers), ids moved along."""
    ordered = []
    for ids, dists in node_results:
        ids, dists = np.asarray(ids), np.asarray(dists)
        order = np.argsort(-dists if descending else dists, axis=1, kind="stable")
        ordered.append((np.take_along_axis(ids, order, axis=1), np.take_along_axis(dists, order, axis=1)))
    return ordered


@settings(max_examples=300, deadline=None)
@given(case=merge_inputs(max_rows=5, max_width=40), best_first=st.booleans())
def test_mapped_head_is_exact_for_the_rows_it_calls_exact(case, best_first):
    """The integer-mapped fast head: each row it does not send to the exact merge equals the
    oracle's row (once the rows it flags for reordering are in (distance, id) order), on sorted
    and unsorted rows with ties, -0.0, NaN, +-inf, padding and repeated ids; None only for a NaN
    or an infinite best distance."""
    node_results, nq, topk, descending = case
    if best_first:
        node_results = _best_first(node_results, descending)
    blocks = merge._answering_nodes(node_results, nq)
    if not blocks:
        return
    ids = np.concatenate([ids for ids, _ in blocks], axis=1)
    dists = np.concatenate([dists for _, dists in blocks], axis=1)
    width = min(topk, ids.shape[1])
    mapped = merge._merge_mapped(ids, dists, width, descending, [block.shape[1] for block, _ in blocks])
    if mapped is None:
        best = dists.max(axis=1) if descending else dists.min(axis=1)
        assert not np.isfinite(best).all()
        return
    merged_ids, merged_dists, merge_exactly, reorder = mapped
    if reorder is not None and reorder.any():  # (None: no row to reorder)
        assert not (merge_exactly & reorder).any()  # the right hits, to be put in (distance, id) order
        merged_ids[reorder], merged_dists[reorder] = merge._by_distance_then_id(
            merged_ids[reorder], merged_dists[reorder], descending
        )
    exact = ~merge_exactly
    expected_ids, expected_dists = oracle(blocks, nq, topk, descending)
    np.testing.assert_array_equal(merged_ids[exact], expected_ids[exact])
    np.testing.assert_array_equal(merged_dists[exact], expected_dists[exact])


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("rows_to_fix", [1, merge.FEW_ROWS + 1], ids=["in python", "vectorised"])
def test_prefix_merge_fixes_ties_and_near_ties_in_the_head(descending, rows_to_fix):
    """Rows whose head holds exact ties (ids in reverse column order), distances one float apart
    (closer than the map tells apart) or a repeated id: the prefix merge still equals the oracle,
    for a few rows (pure Python) and for more (vectorised)."""
    rng = np.random.default_rng(21)
    nq, topk, nodes = 12, 100, 4
    sign = np.float32(-1.0 if descending else 1.0)
    node_results = []
    for node in range(nodes):
        ids = rng.permutation(nq * topk).reshape(nq, topk) * nodes + node
        dists = np.sort(rng.random((nq, topk)).astype(np.float32), axis=1)
        node_results.append((ids, dists))
    (ids_a, dists_a), (ids_b, dists_b) = node_results[0], node_results[1]
    for row in range(rows_to_fix + 3):  # the last 3 only need their order fixed
        dists_b[row, 0] = dists_a[row, 0]  # an exact tie: the later column has the smaller id
        ids_b[row, 0], ids_a[row, 0] = min(ids_a[row, 0], ids_b[row, 0]), max(ids_a[row, 0], ids_b[row, 0])
        dists_b[row, 2] = np.nextafter(dists_a[row, 2], np.float32(2))  # one float apart
        if row < rows_to_fix:
            ids_b[row, 3] = ids_a[row, 1]  # a repeated id: its best copy must stay
    node_results = [(ids, dists * sign) for ids, dists in node_results]

    assert_same(merge_topk(node_results, nq, topk, descending), oracle(node_results, nq, topk, descending))


@pytest.mark.parametrize("descending", [False, True])
def test_mapped_head_serves_sorted_distinct_rows_without_the_exact_path(descending):
    """Node rows best first with distinct float distances and ids (the usual search): every row
    is answered by the fast head, and the merge equals the oracle."""
    rng = np.random.default_rng(5)
    nq, topk, nodes = 50, 100, 4
    node_results = []
    for node in range(nodes):
        ids = rng.permutation(nq * topk).reshape(nq, topk) * nodes + node
        dists = rng.standard_normal((nq, topk)).astype(np.float32) * np.float32(100)
        node_results.append((ids, dists))
    node_results = _best_first(node_results, descending)
    ids = np.concatenate([ids for ids, _ in node_results], axis=1)
    dists = np.concatenate([dists for _, dists in node_results], axis=1)

    merged_ids, merged_dists, merge_exactly, reorder = merge._merge_mapped(ids, dists, topk, descending, [topk] * nodes)

    assert not merge_exactly.any() and (reorder is None or not reorder.any())
    assert_same((merged_ids, merged_dists), oracle(node_results, nq, topk, descending))
    assert_same(merge_topk(node_results, nq, topk, descending), oracle(node_results, nq, topk, descending))


@pytest.mark.parametrize("descending", [False, True])
def test_rows_out_of_order_merge_like_rows_in_order(descending):
    """Rows the compiled kernel cannot walk as sent (ties in descending id order, padding before
    hits, a node that does not sort, a repeated id in one row) give the oracle's answer."""
    sign = np.float32(-1.0 if descending else 1.0)
    tied = (np.array([[9, 7, 5, 3]]), np.array([[1.0, 1.0, 1.0, 2.0]], np.float32) * sign)
    padded_first = (np.array([[-1, 4, 6, -1]]), np.array([[0.0, 1.0, 1.5, 0.5]], np.float32) * sign)
    unsorted = (np.array([[11, 12, 13, 14]]), np.array([[3.0, 0.5, 2.0, 1.0]], np.float32) * sign)
    repeated = (np.array([[8, 8, 2, 8]]), np.array([[0.25, 0.75, 1.0, 3.0]], np.float32) * sign)
    node_results = [tied, padded_first, unsorted, repeated]

    ids, dists = merge_topk(node_results, 1, 10, descending)

    assert_same((ids, dists), oracle(node_results, 1, 10, descending))
    assert ids.tolist() == [[8, 12, 2, 4, 5, 7, 9, 14, 6, 3]]  # 8 at its best copy; ties by id


@pytest.mark.parametrize("descending", [False, True])
def test_long_rows_in_no_order_equal_the_oracle(descending):
    """Rows far from sorted (too many moves for an insertion sort: the kernel sorts them whole),
    with repeats and padding, and rows sorted the wrong way round."""
    rng = np.random.default_rng(9)
    nq, width = 4, 300
    node_results = []
    for node in range(3):
        ids = rng.integers(0, 2000, (nq, width))
        ids[:, rng.integers(0, width, 20)] = -1
        dists = rng.standard_normal((nq, width)).astype(np.float32)
        if node == 2:  # best last
            dists = np.sort(dists, axis=1)[:, ::-1] if not descending else np.sort(dists, axis=1)
        node_results.append((ids, np.ascontiguousarray(dists)))
    assert_same(merge_topk(node_results, nq, 250, descending), oracle(node_results, nq, 250, descending))


def test_widest_rows_with_many_repeats_equal_the_oracle():
    """topk 2048 over three nodes drawing from a few thousand ids: long rows, many repeats."""
    rng = np.random.default_rng(5)
    nq, topk = 3, 2048
    node_results = []
    for _ in range(3):
        ids = rng.integers(0, 3000, (nq, topk))
        dists = np.sort(rng.integers(0, 500, (nq, topk)).astype(np.float32), axis=1)
        node_results.append((ids, dists))
    assert_same(merge_topk(node_results, nq, topk, False), oracle(node_results, nq, topk, False))


def test_the_compiled_kernel_refuses_buffers_that_do_not_fit(kernel):
    """Wrong sizes, types or read-only outputs raise, never read or write past a buffer."""
    if kernel != "compiled":
        pytest.skip("calls the compiled kernel itself: once is enough")
    from mishards.core import _topk

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    dists = np.zeros((2, 3), np.float32)
    out_ids, out_dists = np.empty((2, 3), np.int64), np.empty((2, 3), np.float32)
    _topk.merge_rows((ids,), (dists,), 2, 3, False, out_ids, out_dists)  # fits
    assert out_ids.tolist() == ids.tolist()
    refused = [
        ((ids,), (dists[:1],), 2, 3, False, out_ids, out_dists),  # distances for one row only
        ((ids,), (dists,), 4, 3, False, out_ids, out_dists),  # 6 values are not 4 rows
        ((ids,), (dists,), 2, 4, False, out_ids, out_dists),  # outputs too small for the width
        ((ids,), (dists,), 2, 3, False, out_ids, np.empty(6, np.float64)),  # 8-byte distances out
        ((ids,), (dists,), 2, 3, False, out_ids.view(np.uint8)[1:9], out_dists),  # misaligned
        ((ids,), (dists,), 2, 0, False, out_ids, out_dists),  # width 0
        ((), (), 2, 3, False, out_ids, out_dists),  # no node
        ((ids,), (dists, dists), 2, 3, False, out_ids, out_dists),  # unequal tuples
        ((ids[:, ::2],), (dists,), 2, 3, False, out_ids, out_dists),  # not contiguous
        ((ids,), (dists,), 2, 3, False, np.frombuffer(bytes(48), np.int64), out_dists),  # read-only
    ]
    for arguments in refused:
        with pytest.raises((ValueError, TypeError, BufferError)):
            _topk.merge_rows(*arguments)
    # lists of Python numbers, answered as lists when no outputs are given
    assert _topk.merge_rows(([5, 3],), ([0.5, 0.25],), 1, 2, False) == ([3, 5], [0.25, 0.5])
    for ids_list, distances_list in (([5, "3"], [0.5, 0.25]), ([5, 3], [0.5, None]), ([5, 2**64], [0.5, 0.25])):
        with pytest.raises((TypeError, OverflowError)):
            _topk.merge_rows((ids_list,), (distances_list,), 1, 2, False)
    with pytest.raises(ValueError):
        _topk.merge_rows(([5, 3, 1],), ([0.5, 0.25],), 1, 2, False)


def test_malformed_list_replies_are_an_unexpected_error():
    """A node's flat lists that are not nq equal rows."""
    for node_ids, node_distances in (([1, 2, 3], [0.1, 0.2, 0.3]), ([1, 2], [0.1])):
        with pytest.raises(UnexpectedError, match="malformed node result"):
            merge_topk([(node_ids, node_distances), ([7, 8], [0.5, 0.6])], 2, 5, False)


def test_distances_viewed_at_an_odd_offset_merge_like_aligned_ones():
    """The reply decoder views float32 distances in place, at any byte offset of the reply."""
    rng = np.random.default_rng(3)
    node_results = []
    for node in range(3):
        ids = rng.permutation(40).reshape(4, 10) * 3 + node
        dists = np.sort(rng.random((4, 10)).astype(np.float32), axis=1)
        unaligned = np.frombuffer(b"\0" + dists.tobytes(), np.float32, offset=1).reshape(4, 10)
        assert not unaligned.flags.aligned
        node_results.append((ids, unaligned))
    assert_same(merge_topk(node_results, 4, 10, False), oracle(node_results, 4, 10, False))

"""Merge of per-node top-k results into the reply one Milvus server would have sent.

Each read-only node answers for its share of the files: per query row, its best `k_i` hits,
padded with id -1. The proxy keeps, per row, the best `topk` distinct ids over all nodes.

Rules (each fixes a defect of the original merge, docs/semantics.md, "Merging"):

* Direction: ascending distance for L2 and the binary metrics, descending for IP.
* Entries with id -1 are padding and never compete, whatever their distance.
* An id returned more than once (by several nodes, or twice by one) is kept once, with its best
  distance.
* Ties are broken by ascending id, so the reply does not depend on node order or timing.
  Distances compare as floats (``-0.0 == 0.0``); NaN ranks after every number.
* Width: ``K = min(topk, sum of the nodes' widths k_i)``, never re-padded to topk. A 0.9.1 server
  merges its files' results the same way (``min(topk, src_k + tar_k)`` per file, each file giving
  ``min(topk, its live rows)``), so the reply has the width one server searching the same files
  would send, and pymilvus -- which cuts each row at its first -1 -- sees the same hits and the
  same ``shape``. Rows with fewer than K hits are padded with id -1 and the worst distance
  (+FLT_MAX ascending, -FLT_MAX descending), as faiss pads. Narrowing K to the most hits found in
  any row would save bytes but turns "nq rows with no hits" into "no rows" on the client. When
  K is 0 (no node searched a live row) the reply has no rows at all, (0, 0): what one server
  answers for files without live rows (``row_num = 0``).
* Match filters (SUBSTRUCTURE, SUPERSTRUCTURE) have no distance to rank by: each node reports its
  first matches in storage order, all at 0.0. With ``match_filter`` the merge keeps the nodes'
  reply order instead (an entry's column in its node's row, then ascending id), so ties are kept
  deterministically and never sorted by a made-up distance.

How it is fast: nodes send each row best first, so the merge is a k-way merge that walks every
node's row from the front: nq x width x nodes small steps, no sort. It is compiled (_topk.c, built
by `pip install` where a C compiler is found; compiled.COMPILED_KERNELS says whether it was): the same loop in
numpy calls or Python costs far more per step than the step itself. The kernel first checks
that each row is in (key, id) order, with padding only at its end, and fixes any row that is not
(ties sent in another id order: run by run; a node that does not sort: the whole row), so the
answer never depends on the nodes' order; a hash set of the row's kept ids drops repeats. It
reads node replies given as Python lists itself and answers lists for them.

Without the kernel, the numpy path below merges arrays; the two are held to one oracle by the
same property tests. Distances become uint32 keys whose unsigned order is the rank order (padding and
NaN get the top codes), packed with the candidate's column into one uint64, so a plain SIMD value
sort (not an argsort) orders a row. That order breaks ties by column, not by id, and does not
remove duplicates; both only matter when the selected head of a row contains an equal key or a
repeated id, which is checked per row. Only those rows take the exact path, which argsorts by id
just the candidates that can still make the cut.

Large merges first look only at a prefix of each node's row, a little more than that node's
share of the width (nodes hold random shares of the files, so each contributes about
width / nodes hits). The prefix merge is the answer for every row whose width-th hit is real and
strictly better than the best candidate left out (nodes send their rows best first, so that is
the rule, not the exception); the other rows are merged again from all their candidates. So the
sort works on about 1.75 x width candidates per row instead of nodes x width. The prefixes are
ordered through distances mapped linearly per row onto 24-bit integers (_merge_mapped), which
keeps nearly all of a float's resolution where the row's head lies, so a 32-bit sort leaves
almost no row to fix up; rows with a tie, a repeated id or padding in the head are merged
exactly, from their prefixes still.

Without the kernel, small merges run in pure Python, numpy's fixed per-call costs exceed the
whole merge there; node replies decoded to Python lists (wire.decode_topk_hits) are merged as
lists and come back as lists, without any conversion. faiss.merge_knn_results neither drops
repeated ids nor breaks ties by id, so the proxy cannot use it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from itertools import accumulate, chain
from operator import itemgetter, neg
from typing import Any, Literal

import numpy as np

from mishards.core.compiled import kernels as _kernels
from utils.errors import IllegalTopK, UnexpectedError

_KERNEL_LAYOUT: list[Literal["C", "A"]] = ["C", "A"]  # C-contiguous and aligned, as _topk.c reads its buffers

PADDING_ID = -1
FLT_MAX = float(np.finfo(np.float32).max)

SMALL_MERGE_CANDIDATES = 64
"""Up to this many candidates (nq x sum of widths) the pure-Python merge is faster: measured
~12-20 us against the numpy path's ~31 us floor at 20-50 candidates, even at 60-80."""

SMALL_LIST_CANDIDATES = 256
"""Node results given as Python lists are merged in Python up to this many candidates (no
conversion to numpy at all); beyond it they become arrays."""

ONE_QUERY_LIST_CANDIDATES = 1024
"""The same limit for one query row, whose one sort of positions stays cheaper than converting
to numpy further (measured at 400 and 800 candidates: ~2.5x and ~2x)."""

NARROW_COLUMN_BITS = 10
"""Rows of up to 2**10 candidates sort as uint32 (coarse key, column); wider ones as uint64."""

NARROW_EXTRA = 8
"""Entries sorted past the width: a run of equal coarse keys across the cut must end inside."""

_MAPPED_KEY_BITS = 24  # float32 holds every integer below 2**24 exactly

FEW_ROWS = 4
"""Up to this many rows the prefix merge fixes up in pure Python (_merge_rows_in_python)."""

PREFIX_MIN_CANDIDATES = 4096
"""From this many candidates on, the vectorised merge tries the node prefixes first."""

_ID_HASH_MULTIPLIER = np.uint64(0x9E37_79B9_7F4A_7C15)  # odd, bits well mixed: 2**64 / golden ratio
_PADDING_KEY = np.uint32(0xFFFF_FFFF)
_NAN_KEY = np.uint32(0xFFFF_FFFE)  # after +inf (0xFF80_0000), before padding
_KEY_HALF = 1 if sys.byteorder == "little" else 0  # the high 32 bits of a uint64 seen as 2 x uint32
_COLUMN_HALF = 1 - _KEY_HALF

NodeResult = tuple[np.ndarray, np.ndarray] | tuple[list[int], list[float]]
"""One node's answer: ids (int64) and distances (float32), both shaped (nq, k_i), k_i may be 0;
or both as flat row-major Python lists of nq x k_i values, as protobuf hands them over."""


def padding_distance(descending: bool) -> float:
    """The distance faiss writes next to a -1 id: the worst possible value for the direction."""
    return -FLT_MAX if descending else FLT_MAX


def merge_topk(
    node_results: Sequence[NodeResult], nq: int, topk: int, descending: bool, match_filter: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[list[int], list[float]]:
    """The best `topk` distinct ids per query row over all nodes, shaped (nq, K), or (0, 0) when
    K is 0 (module docstring). `match_filter`: rank by reply order, not by distance.

    When every node result is lists and the merge is small, the answer is flat row-major lists
    too (nq x K values, empty when K is 0); otherwise int64/float32 arrays.
    """
    if topk < 1:
        raise IllegalTopK(f"topk must be at least 1, got {topk}")
    if _kernels is not None and not match_filter and node_results and all(type(ids) is list for ids, _ in node_results):
        return _merge_lists_compiled(node_results, nq, topk, descending)
    if nq == 1 and not match_filter:
        merged = _merge_one_row_of_lists(node_results, topk, descending)
        if merged is not None:
            return merged
    if node_results and all(type(ids) is list for ids, _ in node_results):
        lists = [_checked_lists(ids, distances, nq) for ids, distances in node_results]
        lists = [node for node in lists if node[2]]
        if nq * sum(node_width for _, _, node_width in lists) <= SMALL_LIST_CANDIDATES:
            return _merge_lists(lists, nq, topk, descending, match_filter)
    blocks = _answering_nodes(node_results, nq)
    candidates_per_row = sum(ids.shape[1] for ids, _ in blocks)
    width = min(topk, candidates_per_row)
    if width == 0:
        return np.empty((0, 0), np.int64), np.empty((0, 0), np.float32)
    if match_filter:
        return _merge_in_reply_order(blocks, width, descending)
    if _kernels is not None:
        return _merge_compiled(blocks, nq, width, descending)
    if nq * candidates_per_row <= SMALL_MERGE_CANDIDATES:
        as_lists = [(ids.ravel().tolist(), distances.ravel().tolist(), ids.shape[1]) for ids, distances in blocks]
        ids, distances = _merge_lists(as_lists, nq, topk, descending, False)
        return np.array(ids, np.int64).reshape(nq, width), np.array(distances, np.float32).reshape(nq, width)
    if nq * candidates_per_row >= PREFIX_MIN_CANDIDATES:
        from_prefixes = _merge_prefixes(blocks, width, descending)
        if from_prefixes is not None:
            return from_prefixes
    all_ids = np.concatenate([ids for ids, _ in blocks], axis=1)
    all_distances = np.concatenate([distances for _, distances in blocks], axis=1)
    return _merge_vectorised(all_ids, all_distances, width, descending)


Block = tuple[np.ndarray, np.ndarray]
"""A node result as (nq, k) int64 ids and float32 distances."""


def _merge_lists_compiled(
    node_results: Sequence[NodeResult], nq: int, topk: int, descending: bool
) -> tuple[list[int], list[float]]:
    """Flat row-major lists through the compiled kernel, which reads and checks them itself
    (converting them to arrays in Python first would cost more than the merge), back as flat
    lists. At these sizes every Python step counts: one zip, no per-node calls."""
    ids, distances = zip(*node_results, strict=True)
    width = min(topk, sum(map(len, ids)) // nq) if nq >= 1 else 0
    if width == 0:
        for node_ids, node_distances in node_results:
            _checked_lists(node_ids, node_distances, nq)  # malformed input raises
        return [], []
    try:
        return _kernels.merge_rows(ids, distances, nq, width, descending)
    except (ValueError, TypeError) as error:
        raise UnexpectedError(f"malformed node result: {error}") from None


def _merge_compiled(blocks: list[Block], nq: int, width: int, descending: bool) -> Block:
    """The compiled k-way merge: walks each node's row from the front (rows out of (distance,
    id) order are fixed first), so its cost is about nq x width x nodes steps, not a sort."""
    merged_ids = np.empty((nq, width), np.int64)
    merged_distances = np.empty((nq, width), np.float32)
    # (distances decoded from a reply are viewed in place there, at any byte offset: copied if unaligned)
    _kernels.merge_rows(
        tuple(np.require(ids, np.int64, _KERNEL_LAYOUT) for ids, _ in blocks),
        tuple(np.require(distances, np.float32, _KERNEL_LAYOUT) for _, distances in blocks),
        nq,
        width,
        descending,
        merged_ids,
        merged_distances,
    )
    return merged_ids, merged_distances


def _merge_one_row_of_lists(
    node_results: Sequence[NodeResult], topk: int, descending: bool
) -> tuple[list[int], list[float]] | None:
    """The commonest search (one query, list replies) when the answer has no padding, NaN, tie or
    repeated id: one sort of positions by distance, as cheap as the original merge. None
    otherwise (the general paths decide, and raise for malformed input)."""
    ids: list[int] = []
    distances: list[float] = []
    for node_ids, node_distances in node_results:
        if type(node_ids) is not list or type(node_distances) is not list or len(node_ids) != len(node_distances):
            return None
        ids += node_ids
        distances += node_distances
    count = len(ids)
    if count < 2 or count > ONE_QUERY_LIST_CANDIDATES:  # (itemgetter of one index gives no tuple)
        return None
    total = sum(distances)
    if total != total:  # a NaN (or inf - inf): float comparisons would not order the row
        return None
    # one entry past topk, to see a tie across the cut; padding or a repeat in it: general path
    if descending:
        head = sorted(range(count), key=distances.__getitem__, reverse=True)[: topk + 1]
    else:
        head = sorted(range(count), key=distances.__getitem__)[: topk + 1]
    pick = itemgetter(*head)
    best_ids, best_distances = pick(ids), pick(distances)
    if -1 in best_ids or len(set(best_ids)) != len(head) or len(set(best_distances)) != len(head):
        return None
    return list(best_ids[:topk]), list(best_distances[:topk])


def _checked_lists(ids: Any, distances: Any, nq: int) -> tuple[list[int], list[float], int]:
    """(ids, distances, width) of a node result given as flat lists; malformed ones raise."""
    if type(distances) is not list or len(ids) != len(distances) or (len(ids) and (nq < 1 or len(ids) % nq)):
        raise UnexpectedError(
            f"malformed node result: {len(ids)} ids and {len(distances)} distances are not {nq} equal rows"
        )
    return ids, distances, len(ids) // nq if ids else 0


def _answering_nodes(node_results: Sequence[NodeResult], nq: int) -> list[Block]:
    """The node results that hold candidates, as int64/float32 (nq, k_i) arrays; malformed ones raise."""
    blocks = []
    for ids, distances in node_results:
        if type(ids) is list:
            ids, distances, node_width = _checked_lists(ids, distances, nq)
            ids = np.array(ids, dtype=np.int64).reshape(nq if node_width else 0, node_width)
            distances = np.array(distances, dtype=np.float32).reshape(ids.shape)
        ids = np.asarray(ids, dtype=np.int64)
        distances = np.asarray(distances, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != distances.shape:
            raise UnexpectedError(
                f"malformed node result: ids {ids.shape} and distances {distances.shape} must be "
                "two equal (rows, k) shapes"
            )
        if ids.size == 0:
            continue
        if ids.shape[0] != nq:
            raise UnexpectedError(f"a node answered {ids.shape[0]} query rows, the search has {nq}")
        blocks.append((ids, distances))
    return blocks


def _merge_lists(
    lists: list[tuple[list[int], list[float], int]], nq: int, topk: int, descending: bool, match_filter: bool
) -> tuple[list[int], list[float]]:
    """The pure-Python merge of flat row-major lists (nodes without candidates left out)."""
    width = min(topk, sum(node_width for _, _, node_width in lists))
    if width == 0:
        return [], []
    padding = padding_distance(descending)
    merged_ids: list[int] = []
    merged_distances: list[float] = []
    for row in range(nq):
        if match_filter:
            row_ids, row_distances = _row_in_reply_order(lists, row, width)
        else:
            if nq == 1:
                candidate_ids = list(chain.from_iterable(ids for ids, _, _ in lists))
                candidate_distances = list(chain.from_iterable(distances for _, distances, _ in lists))
            else:
                candidate_ids = list(chain.from_iterable(ids[row * w : row * w + w] for ids, _, w in lists))
                candidate_distances = list(chain.from_iterable(ds[row * w : row * w + w] for _, ds, w in lists))
            row_ids, row_distances = _row_by_distance(candidate_ids, candidate_distances, width, descending)
        merged_ids += row_ids
        merged_distances += row_distances
        missing = width - len(row_ids)
        if missing:
            merged_ids += [PADDING_ID] * missing
            merged_distances += [padding] * missing
    return merged_ids, merged_distances


def _row_by_distance(
    ids: list[int], distances: list[float], width: int, descending: bool
) -> tuple[list[int], list[float]]:
    """One row's best `width` distinct ids and their distances.

    Without ties or repeated ids (sets of the values tell; -0.0 and 0.0 are one value) a sort of
    the positions by distance is the answer, as cheap as the original merge's. Otherwise (key, id)
    tuples sort in rank order: tuples compare floats with ==, so -0.0 and 0.0 tie and the id
    decides; the first copy of an id is its best. NaN compares false to everything, so a row with
    one (found through the sum, which inf - inf also trips) gets (is NaN, key, id) tuples.
    """
    if PADDING_ID in ids:
        pairs = [(d, i) for i, d in zip(ids, distances, strict=True) if i != PADDING_ID]
        ids = [i for _, i in pairs]
        distances = [d for d, _ in pairs]
    if not ids:
        return [], []
    distinct_ids = len(set(ids)) == len(ids)
    if distances and math.isnan(sum(distances)):
        sign = -1.0 if descending else 1.0
        ranked = sorted((d != d, 0.0 if d != d else sign * d, i, d) for i, d in zip(ids, distances, strict=True))
        best = [(i, d) for _, _, i, d in ranked]
    elif distinct_ids and len(set(distances)) == len(distances):
        order = sorted(range(len(distances)), key=distances.__getitem__, reverse=descending)[:width]
        return [ids[j] for j in order], [distances[j] for j in order]
    elif descending:
        best = [(i, -key) for key, i in sorted(zip(map(neg, distances), ids, strict=True))]
    else:
        best = [(i, d) for d, i in sorted(zip(distances, ids, strict=True))]
    if not distinct_ids:
        kept: dict[int, float] = {}
        for vector_id, distance in best:
            if vector_id not in kept:
                kept[vector_id] = distance
                if len(kept) == width:
                    break
        return list(kept), list(kept.values())
    best = best[:width]
    return [i for i, _ in best], [d for _, d in best]


def _row_in_reply_order(
    lists: list[tuple[list[int], list[float], int]], row: int, width: int
) -> tuple[list[int], list[float]]:
    """One row of a match-filter merge: (column, id) order, each id at its earliest copy
    (smallest column, then first node), as _merge_in_reply_order."""
    ranked = sorted(
        (column, vector_id, node, distance)
        for node, (ids, distances, w) in enumerate(lists)
        for column, (vector_id, distance) in enumerate(
            zip(ids[row * w : row * w + w], distances[row * w : row * w + w], strict=True)
        )
        if vector_id != PADDING_ID
    )
    kept: dict[int, float] = {}
    for _, vector_id, _, distance in ranked:
        if vector_id not in kept:
            kept[vector_id] = distance
            if len(kept) == width:
                break
    return list(kept), list(kept.values())


def _merge_prefixes(blocks: list[Block], width: int, descending: bool) -> Block | None:
    """Merge each node's row prefix, then redo the rows the left-out candidates could change.

    A row's prefix merge is exact when its width-th hit is real and strictly better than every
    left-out candidate: those can then neither enter nor carry a better copy of a kept id. None
    when the prefixes would hold most of the candidates anyway.
    """
    nodes = len(blocks)
    share = width / nodes
    prefix = math.ceil(share + 4 * math.sqrt(share * (1 - 1 / nodes)) + 1)
    kept = [min(ids.shape[1], prefix) for ids, _ in blocks]
    if sum(kept) * 4 > sum(ids.shape[1] for ids, _ in blocks) * 3:
        return None
    ids = np.concatenate([ids[:, :count] for (ids, _), count in zip(blocks, kept, strict=True)], axis=1)
    distances = np.concatenate([d[:, :count] for (_, d), count in zip(blocks, kept, strict=True)], axis=1)
    mapped = _merge_mapped(ids, distances, width, descending, kept)
    if mapped is None:
        merged_ids, merged_distances = _merge_vectorised(ids, distances, width, descending)
    else:  # the rows with a tie, a repeat or padding in their head: merged exactly, from the prefixes still
        merged_ids, merged_distances, merge_exactly, reorder = mapped
        # (each flatnonzero only behind an any(): at these sizes a numpy call costs microseconds)
        if reorder is not None and reorder.any():
            tied = np.flatnonzero(reorder)
            merged_ids[tied], merged_distances[tied] = _by_distance_then_id(
                merged_ids[tied], merged_distances[tied], descending
            )
        if merge_exactly.any():
            fix = np.flatnonzero(merge_exactly)
            if fix.size <= FEW_ROWS:  # a row or two: the pure-Python merge's fixed cost is lower
                _merge_rows_in_python(ids, distances, fix, width, descending, merged_ids, merged_distances)
            else:
                merged_ids[fix], merged_distances[fix] = _merge_vectorised(ids[fix], distances[fix], width, descending)
    tails = [d[:, count:] for (_, d), count in zip(blocks, kept, strict=True) if d.shape[1] > count]
    cut = merged_distances[:, width - 1]
    # a NaN anywhere makes the comparison false: the row is redone
    exact = (_best_of_tails(tails, descending) < cut) if descending else (_best_of_tails(tails, descending) > cut)
    exact &= merged_ids[:, width - 1] != PADDING_ID
    if not exact.all():
        redo = np.flatnonzero(~exact)
        all_ids = np.concatenate([ids[redo] for ids, _ in blocks], axis=1)
        all_distances = np.concatenate([d[redo] for _, d in blocks], axis=1)
        merged_ids[redo], merged_distances[redo] = _merge_vectorised(all_ids, all_distances, width, descending)
    return merged_ids, merged_distances


def _by_distance_then_id(ids: np.ndarray, distances: np.ndarray, descending: bool) -> Block:
    """Rows (no NaN) put in rank order: by distance, ties by ascending id (-0.0 ties 0.0)."""
    order = np.lexsort((ids, np.negative(distances) if descending else distances), axis=1)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(distances, order, axis=1)


def _merge_rows_in_python(
    ids: np.ndarray,
    distances: np.ndarray,
    rows: np.ndarray,
    width: int,
    descending: bool,
    merged_ids: np.ndarray,
    merged_distances: np.ndarray,
) -> None:
    """Merge the given rows exactly with the pure-Python row merge, into merged_ids/distances.

    For a few rows this costs ~30 us each, where the vectorised exact path's fixed cost is
    ~150 us (measured at 176 candidates per row)."""
    padding = padding_distance(descending)
    for row in rows.tolist():
        row_ids, row_distances = _row_by_distance(ids[row].tolist(), distances[row].tolist(), width, descending)
        missing = width - len(row_ids)
        merged_ids[row] = row_ids + [PADDING_ID] * missing
        merged_distances[row] = row_distances + [padding] * missing


def _best_of_tails(tails: list[np.ndarray], descending: bool) -> np.ndarray:
    """Per row, the best distance left out of the prefix merge (NaN if any is NaN).

    Equal tail shapes (nodes of one width) are folded elementwise first, then reduced once:
    one reduction along rows instead of one per node (measured ~2x cheaper)."""
    fold = np.maximum if descending else np.minimum
    if all(tail.shape == tails[0].shape for tail in tails):
        best = fold(tails[0], tails[1]) if len(tails) > 1 else tails[0].copy()
        for tail in tails[2:]:
            fold(best, tail, out=best)
        return best.max(axis=1) if descending else best.min(axis=1)
    return fold.reduce([tail.max(axis=1) if descending else tail.min(axis=1) for tail in tails])


def _starts(widths: Sequence[int]) -> list[int]:
    """Where each node's columns start in the concatenated rows (plain ints: tiny numpy calls cost more)."""
    return [total - width for total, width in zip(accumulate(widths), widths, strict=True)]


def _merge_mapped(
    ids: np.ndarray, distances: np.ndarray, width: int, descending: bool, node_widths: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The fast head of each row for float distances, and two row masks: the rows to merge
    exactly instead, and the rows that hold the right hits but must be put in (distance, id)
    order (None: no such row); or None when the input has a NaN or an infinite best distance
    (the general path takes it).

    Each row's distances are mapped linearly onto integers below 2**24 (float32 holds those
    exactly), ``(d - best) * scale``, and packed with the candidate's column into a uint32, so one
    32-bit value sort orders the row. The scale puts a bound of the row's width-th distance near
    the top of the range (for node rows sorted best first: the worst of each node's
    ``width / nodes``-th hit), so the head keeps ~23 bits of resolution where it matters instead
    of the few left when bits are cut from the float's encoding; distances past the range share
    its top value. The map only ever merges neighbours (float rounding is monotone), so a row is
    exact unless its head has two equal integers (a tie, or distances too close to tell apart),
    a repeated id, or padding. Equal integers only inside the width leave the hits right but
    their order to fix; equal integers across the cut (the run may go on past the head), a
    repeat or padding need the exact merge.
    """
    rows, columns = ids.shape
    column_bits = max(1, (columns - 1).bit_length())
    if column_bits > NARROW_COLUMN_BITS:
        return None
    share = -(-width // len(node_widths))
    bound_columns = [
        start + min(share, count) - 1 for start, count in zip(_starts(node_widths), node_widths, strict=True)
    ]
    if descending:
        best, bound = distances.max(axis=1), distances[:, bound_columns].min(axis=1)
    else:
        best, bound = distances.min(axis=1), distances[:, bound_columns].max(axis=1)
    worst_best = float(best.min()), float(best.max())  # NaN if any is (min and max carry it)
    if not (math.isfinite(worst_best[0]) and math.isfinite(worst_best[1])):  # NaN or an infinite best
        return None
    key_bits = min(_MAPPED_KEY_BITS, 32 - column_bits)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = np.float32((1 << key_bits) - (1 << (key_bits - 3))) / (bound - best)
        low, high = float(scale.min()), float(scale.max())
        usable = (-math.inf < low and high < 0) if descending else (0 < low and high < math.inf)
        if not usable:
            # a zero or infinite span maps the row to few values: its runs send it to the exact path
            scale[~np.isfinite(scale) | (scale == 0)] = -1.0 if descending else 1.0
        mapped = distances - best[:, None]
        mapped *= scale[:, None]
    np.minimum(mapped, np.float32((1 << key_bits) - 1), out=mapped)
    packed = mapped.astype(np.uint32)
    packed <<= np.uint32(column_bits)
    packed |= np.arange(columns, dtype=np.uint32)
    head_width = min(width + 1, columns)  # one entry past the width, to see a tie across the cut
    if head_width * 2 < columns:
        packed.partition(head_width - 1, axis=1)
        head = np.sort(packed[:, :head_width], axis=1)
    else:
        packed.sort(axis=1)
        head = packed[:, :head_width]
    reorder = None
    equal_keys = (head[:, 1:] ^ head[:, :-1]) < np.uint32(1 << column_bits)  # same integer, any column
    if equal_keys.any():  # (one reduction over all rows first: per-row ones cost more)
        reorder = equal_keys.any(axis=1)
        # a run across the cut may go on past the head
        merge_exactly = equal_keys[:, width - 1].copy() if head_width > width else np.zeros(rows, dtype=bool)
    # flat indices as uint32 and `take`: cheaper than intp fancy indexing (measured)
    flat = head[:, :width] & np.uint32((1 << column_bits) - 1)
    flat += np.arange(0, rows * columns, columns, dtype=np.uint32)[:, None]
    merged_ids = ids.reshape(-1).take(flat)
    merged_distances = distances.reshape(-1).take(flat)
    # repeated ids, through their low 32 bits (a collision only costs the exact path); padding,
    # whose low bits are all ones, sorts last
    low_bits = merged_ids.astype(np.uint32)
    low_bits.sort(axis=1)
    repeats = low_bits[:, 1:] == low_bits[:, :-1]
    padded = low_bits[:, -1] == np.uint32(0xFFFF_FFFF)
    if reorder is None:
        merge_exactly = padded
    else:
        merge_exactly |= padded
    if repeats.any():
        merge_exactly |= repeats.any(axis=1)
    if reorder is not None:
        reorder &= ~merge_exactly
    return merged_ids, merged_distances, merge_exactly, reorder


def _merge_in_reply_order(blocks: list[Block], width: int, descending: bool) -> Block:
    """Per row, the distinct ids ordered by (column in their node's row, id); an id several nodes
    returned keeps its earliest copy (smallest column, then first node)."""
    ids = np.concatenate([ids for ids, _ in blocks], axis=1)
    distances = np.concatenate([distances for _, distances in blocks], axis=1)
    columns = np.concatenate([np.broadcast_to(np.arange(b.shape[1]), b.shape) for b, _ in blocks], axis=1)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    by_id = np.lexsort((positions, columns, ids), axis=1)  # copies of an id together, earliest first
    sorted_ids = _take_per_row(ids, by_id)
    later_copy = np.zeros(ids.shape, dtype=bool)
    later_copy[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dropped = np.empty_like(later_copy)
    np.put_along_axis(dropped, by_id, later_copy, axis=1)
    dropped |= ids == PADDING_ID
    order = np.lexsort((ids, columns, dropped), axis=1)[:, :width]
    merged_ids = _take_per_row(ids, order)
    merged_distances = _take_per_row(distances, order)
    is_padding = _take_per_row(dropped, order)
    merged_ids[is_padding] = PADDING_ID
    merged_distances[is_padding] = padding_distance(descending)
    return merged_ids, merged_distances


def _merge_vectorised(ids: np.ndarray, distances: np.ndarray, width: int, descending: bool) -> Block:
    """Sort rows by (key, column); redo exactly only the rows whose head has a tie or a repeated id."""
    keys, has_nan = _rank_keys(ids, distances, descending)
    column_bits = max(1, (ids.shape[1] - 1).bit_length())
    if column_bits <= NARROW_COLUMN_BITS and not has_nan:
        head_width = min(width + NARROW_EXTRA, ids.shape[1])
        coarse_keys, flat = _narrow_head(keys, column_bits, head_width)
        padding_coarse = _PADDING_KEY >> np.uint32(column_bits)
    else:
        head_width = min(width + 1, ids.shape[1])  # one entry past the width, to see a tie across the cut
        head = _sorted_head(_pack(keys), head_width)
        coarse_keys = _halves(head)[..., _KEY_HALF]
        flat = _halves(head)[..., _COLUMN_HALF].astype(np.intp)
        padding_coarse = _PADDING_KEY
    flat += np.arange(0, ids.size, ids.shape[1], dtype=np.intp)[:, None]

    # The head is in rank order but for runs of equal (coarse) keys, which are in column order:
    # the rows that have one are sorted again by (full key, id), just their heads. A run that
    # reaches the end of the head and began inside the width may go on past the head: that row,
    # like a row with a repeated id (a copy must go), takes the exact path.
    inexact = np.zeros(ids.shape[0], dtype=bool)
    runs = (coarse_keys[:, 1:] == coarse_keys[:, :-1]) & (coarse_keys[:, 1:] != padding_coarse)
    in_run = np.flatnonzero(runs.any(axis=1))
    if in_run.size:
        if head_width < ids.shape[1]:
            inexact[in_run] = runs[in_run, width - 1 : head_width - 1].all(axis=1)
        in_run = in_run[~inexact[in_run]]
        run_flat = flat[in_run]
        flat[in_run] = _by_key_then_id(ids.reshape(-1)[run_flat], run_flat, keys.reshape(-1))
    merged_flat = flat[:, :width]
    merged_ids = ids.reshape(-1)[merged_flat]
    merged_distances = distances.reshape(-1)[merged_flat]
    is_padding = keys.reshape(-1)[merged_flat[:, -1]] == _PADDING_KEY  # padding sorts last
    if is_padding.any():
        is_padding = keys.reshape(-1)[merged_flat] == _PADDING_KEY
    else:
        is_padding = None

    # Repeats are looked for among 32-bit hashes of the ids (a 32-bit sort is several times
    # cheaper than a 64-bit one); a hash collision only sends a row to the exact path.
    hashes = ((merged_ids.view(np.uint64) * _ID_HASH_MULTIPLIER) >> np.uint64(32)).astype(np.uint32)
    if is_padding is not None:  # several -1 must not look like a repeat: give them distinct hashes
        hashes[is_padding] = np.nonzero(is_padding)[1].astype(np.uint32)
    hashes.sort(axis=1)
    inexact |= (hashes[:, 1:] == hashes[:, :-1]).any(axis=1)
    inexact = np.flatnonzero(inexact)
    if inexact.size:
        if is_padding is None:
            is_padding = np.zeros(merged_ids.shape, dtype=bool)
        merged_ids[inexact], merged_distances[inexact], is_padding[inexact] = _merge_contenders_exactly(
            ids[inexact], keys[inexact], distances[inexact], width
        )
    if is_padding is not None and is_padding.any():
        merged_ids[is_padding] = PADDING_ID
        merged_distances[is_padding] = padding_distance(descending)
    return merged_ids, merged_distances


def _by_key_then_id(head_ids: np.ndarray, flat: np.ndarray, flat_keys: np.ndarray) -> np.ndarray:
    """The heads' flat indices re-sorted by (full key, id): a uint64 sort of (key, position),
    then a lexsort for the rows where equal full keys are left in descending id order (a sort
    by key alone does not order ids; cheap when ties are rare, as for float distances)."""
    rows, width = head_ids.shape
    packed = flat_keys[flat].astype(np.uint64) << np.uint64(32)
    packed |= np.arange(width, dtype=np.uint64)
    packed.sort(axis=1)
    order = (packed & np.uint64(0xFFFF_FFFF)).astype(np.intp)
    order += np.arange(0, rows * width, width, dtype=np.intp)[:, None]
    head_ids, flat = head_ids.reshape(-1)[order], flat.reshape(-1)[order]
    sorted_keys = packed >> np.uint64(32)
    misordered = (sorted_keys[:, 1:] == sorted_keys[:, :-1]) & (head_ids[:, 1:] < head_ids[:, :-1])
    tied = np.flatnonzero(misordered.any(axis=1))
    if tied.size:
        order = np.lexsort((head_ids[tied], sorted_keys[tied]), axis=1)
        flat[tied] = np.take_along_axis(flat[tied], order, axis=1)
    return flat


def _narrow_head(keys: np.ndarray, column_bits: int, head_width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `head_width` of each row by (coarse key, column) through one uint32 sort.

    A key's low `column_bits` bits make way for the column; numpy's 32-bit sort is several times
    faster than its 64-bit one, and the lost bits only turn near-equal keys into runs the caller
    re-sorts. Returns the sorted coarse keys and columns.
    """
    low_bits = np.uint32((1 << column_bits) - 1)
    packed = keys & ~low_bits
    packed |= np.arange(keys.shape[1], dtype=np.uint32)
    if head_width * 2 < keys.shape[1]:
        packed.partition(head_width - 1, axis=1)
        head = np.sort(packed[:, :head_width], axis=1)
    else:
        head = np.sort(packed, axis=1)[:, :head_width]
    return head >> np.uint32(column_bits), (head & low_bits).astype(np.intp)


def _merge_contenders_exactly(
    ids: np.ndarray, keys: np.ndarray, distances: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact merge of rows, ordering by id only the candidates that can still make the cut.

    Those are the real candidates whose key is at most the row's width-th smallest key; the rest
    rank strictly after `width` of them. Only when repeated ids among them were dropped can the
    answer need a candidate from beyond, so such rows are redone whole. With many ties (binary
    metrics) this sorts a little more than `width` ids per row instead of all candidates.
    """
    cut = np.partition(keys, width - 1, axis=1)[:, width - 1 : width]
    contenders = (keys <= cut) & (keys != _PADDING_KEY)
    contender_count = contenders.sum(axis=1)
    if contender_count.max() >= ids.shape[1]:
        merged_ids, merged_distances, is_padding, _ = _merge_rows_exactly(ids, keys, distances, width)
        return merged_ids, merged_distances, is_padding
    merged_ids, merged_distances, is_padding, had_repeats = _merge_rows_exactly(
        *_compact_rows(contenders, contender_count, width, ids, keys, distances), width
    )
    redo = np.flatnonzero(had_repeats)
    if redo.size:
        merged_ids[redo], merged_distances[redo], is_padding[redo], _ = _merge_rows_exactly(
            ids[redo], keys[redo], distances[redo], width
        )
    return merged_ids, merged_distances, is_padding


def _compact_rows(
    selected: np.ndarray, counts: np.ndarray, width: int, ids: np.ndarray, keys: np.ndarray, distances: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The selected candidates of each row moved to the left of (rows, >= width) arrays, padded.

    Uses flat indices: 2-D fancy indexing costs several times more.
    """
    rows, columns = ids.shape
    compact_width = max(int(counts.max()), width)
    sources = np.flatnonzero(selected)
    source_rows = sources // columns
    first_of_row = np.cumsum(counts) - counts
    targets = np.arange(sources.size) + (source_rows * compact_width - first_of_row[source_rows])
    compacted = []
    for values, filler in ((ids, PADDING_ID), (keys, _PADDING_KEY), (distances, 0.0)):
        compact = np.full(rows * compact_width, filler, dtype=values.dtype)
        compact[targets] = values.reshape(-1)[sources]
        compacted.append(compact.reshape(rows, compact_width))
    return compacted[0], compacted[1], compacted[2]


def _merge_rows_exactly(
    ids: np.ndarray, keys: np.ndarray, distances: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Order each row by id, drop the worse copies of repeated ids, then sort by (key, id rank).

    In the id-ordered layout a candidate's column is its id rank, so the packed sort breaks ties
    by ascending id. Returns the (rows, width) ids, distances and padding mask, and which rows
    had repeated ids.
    """
    by_id = np.argsort(ids, axis=1)
    ids_by_id = _take_per_row(ids, by_id)
    packed = _pack(_take_per_row(keys, by_id))
    had_repeats = _demote_repeated_ids(ids_by_id, packed)
    head = _sorted_head(packed, width)
    columns = _halves(head)[..., _COLUMN_HALF].astype(np.intp)
    is_padding = _halves(head)[..., _KEY_HALF] == _PADDING_KEY
    merged_distances = _take_per_row(distances, _take_per_row(by_id, columns))
    return _take_per_row(ids_by_id, columns), merged_distances, is_padding, had_repeats


def _demote_repeated_ids(ids_by_id: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """In rows ordered by id, give every copy of an id but its best one the padding key (in place).

    Returns, per row, whether it had a repeated id.
    """
    continues_run = (ids_by_id[:, 1:] == ids_by_id[:, :-1]) & (ids_by_id[:, 1:] != PADDING_ID)
    had_repeats = continues_run.any(axis=1)
    if not had_repeats.any():
        return had_repeats
    run_starts = np.ones(ids_by_id.shape, dtype=bool)
    run_starts[:, 1:] = ~continues_run
    best_of_run = np.minimum.reduceat(packed.reshape(-1), np.flatnonzero(run_starts))
    run_of_entry = np.cumsum(run_starts.reshape(-1)) - 1
    worse_copies = packed != best_of_run[run_of_entry].reshape(packed.shape)
    _halves(packed)[..., _KEY_HALF][worse_copies] = _PADDING_KEY
    return had_repeats


def _rank_keys(ids: np.ndarray, distances: np.ndarray, descending: bool) -> tuple[np.ndarray, bool]:
    """uint32 keys whose unsigned order is the rank order: best first, then NaN, then padding;
    and whether there was a NaN."""
    oriented = np.negative(distances) if descending else distances.copy()
    oriented += np.float32(0.0)  # -0.0 + 0.0 is 0.0: equal distances get equal keys
    bits = oriented.view(np.int32)
    flips = bits >> 31  # all ones for negative floats, zero otherwise
    flips |= np.int32(-(2**31))  # and always the sign bit
    bits ^= flips  # IEEE float order -> unsigned integer order
    keys = bits.view(np.uint32)
    nan = np.isnan(distances)
    has_nan = bool(nan.any())
    if has_nan:
        keys[nan] = _NAN_KEY
    keys[ids == PADDING_ID] = _PADDING_KEY
    return keys, has_nan


def _pack(keys: np.ndarray) -> np.ndarray:
    """One uint64 per candidate, ``key << 32 | column``: a value sort orders a row by key, then column.

    Written through a uint32 view (no 64-bit shifts or temporaries: at these sizes each one costs).
    """
    packed = np.empty(keys.shape, dtype=np.uint64)
    halves = _halves(packed)
    halves[..., _KEY_HALF] = keys
    halves[..., _COLUMN_HALF] = np.arange(keys.shape[1], dtype=np.uint32)
    return packed


def _halves(packed: np.ndarray) -> np.ndarray:
    """A (..., 2) uint32 view of a uint64 array: index _KEY_HALF is the high half."""
    return packed.view(np.uint32).reshape(*packed.shape, 2)


def _sorted_head(packed: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest values of each row, sorted; partitions `packed` in place first."""
    if count < packed.shape[1]:
        packed.partition(count - 1, axis=1)
    return np.sort(packed[:, :count], axis=1)


def _take_per_row(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``values[r, columns[r, j]]`` through one flat gather (several times faster than take_along_axis)."""
    row_starts = np.arange(values.shape[0], dtype=np.intp)[:, None] * values.shape[1]
    return np.ascontiguousarray(values).reshape(-1)[columns + row_starts]

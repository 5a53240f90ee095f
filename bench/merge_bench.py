"""Micro-benchmark: the top-k merge alone, and the TopKQueryResult encoding, against the old ways.

    .venv/bin/python -m bench.merge_bench

Merge grid: nq in {1, 10, 100} x topk in {10, 100} x nodes in {2, 4, 8}. Every node answers a
full (nq, topk) block of ascending L2 distances with distinct ids (the usual case: each file is
searched by one node). Compared with the original Mishards merge -- per query row, fold the nodes
in pairwise, concatenating two lists and `sorted` by distance -- on the flat Python lists it got
from protobuf. Neither side pays for decoding. faiss.merge_knn_results is shown for reference
only: it does not drop repeated ids or break ties by id, so the proxy cannot use it as is.

Then one tie-heavy case (integer distances, as HAMMING gives), where the vectorised merge must
order tied candidates by id, and the cost of encoding a 10k-value reply.
Prints medians; the machine is shared, so expect +-30%.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from milvus_grpc import milvus_pb2
from mishards.core.merge import merge_topk
from mishards.core.wire import decode_topk_result, encode_topk_result

try:
    import faiss
except ImportError:  # optional reference column
    faiss = None

TARGET = (100, 100, 4, 10.0)  # nq, topk, nodes, minimum speed-up over the pairwise merge


def median_seconds(function: Callable[[], object], budget: float = 0.3) -> float:
    """Median time of one call: batches sized to ~1/15 of the budget, 15 batches."""
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            function()
        elapsed = time.perf_counter() - started
        if elapsed > budget / 15 or calls >= 1 << 16:
            break
        calls *= 2
    samples = []
    for _ in range(15):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def pairwise_sort_merge(node_results: list[tuple[list[int], list[float], int]], topk: int):
    """The original Mishards merge (v0.10.2+, ascending): fold nodes in per row with `sorted`."""
    merged_ids: list[list[int]] = []
    merged_distances: list[list[float]] = []
    for ids, distances, row_num in node_results:
        width = len(ids) // row_num
        for row in range(row_num):
            new_ids = ids[row * width : (row + 1) * width]
            new_distances = distances[row * width : (row + 1) * width]
            if len(merged_ids) <= row:
                merged_ids.append(new_ids)
                merged_distances.append(new_distances)
                continue
            old_ids, old_distances = merged_ids[row], merged_distances[row]
            if old_distances[width - 1] <= new_distances[0]:
                continue
            if new_distances[width - 1] <= old_distances[0]:
                merged_ids[row], merged_distances[row] = new_ids, new_distances
                continue
            both_ids, both_distances = old_ids + new_ids, old_distances + new_distances
            best = sorted(range(len(both_distances)), key=both_distances.__getitem__)[:width]
            merged_ids[row] = [both_ids[index] for index in best]
            merged_distances[row] = [both_distances[index] for index in best]
    return [i for row in merged_ids for i in row], [d for row in merged_distances for d in row]


def node_answers(rng: np.random.Generator, nq: int, topk: int, nodes: int, ties: bool = False):
    """Per node: ids (distinct across nodes) and ascending distances, shaped (nq, topk)."""
    answers = []
    for node in range(nodes):
        ids = rng.permutation(nq * topk).reshape(nq, topk) * nodes + node
        distances = rng.integers(0, 64, (nq, topk)) if ties else rng.random((nq, topk))
        answers.append((ids.astype(np.int64), np.sort(distances.astype(np.float32), axis=1)))
    return answers


def bench_merge(rng: np.random.Generator, nq: int, topk: int, nodes: int, ties: bool = False) -> dict:
    answers = node_answers(rng, nq, topk, nodes, ties)
    as_lists = [(ids.ravel().tolist(), distances.ravel().tolist(), nq) for ids, distances in answers]
    row = {
        "pairwise": median_seconds(lambda: pairwise_sort_merge(as_lists, topk)),
        "numpy": median_seconds(lambda: merge_topk(answers, nq, topk, False)),
    }
    if faiss is not None:
        stacked_distances = np.stack([distances for _, distances in answers])
        stacked_ids = np.stack([ids for ids, _ in answers])
        row["faiss"] = median_seconds(lambda: faiss.merge_knn_results(stacked_distances, stacked_ids))
    return row


def print_merge_table(rng: np.random.Generator) -> bool:
    header = (
        f"{'nq':>4} {'topk':>5} {'nodes':>5} {'candidates':>10} {'pairwise sort':>14} {'merge_topk':>11} "
        f"{'speed-up':>9}"
    )
    print("Merge of per-node top-k results (median per call)")
    print(header + (f" {'faiss (ref.)':>13}" if faiss else ""))
    target_met = False
    for nq in (1, 10, 100):
        for topk in (10, 100):
            for nodes in (2, 4, 8):
                row = bench_merge(rng, nq, topk, nodes)
                ratio = row["pairwise"] / row["numpy"]
                line = (
                    f"{nq:>4} {topk:>5} {nodes:>5} {nq * topk * nodes:>10} "
                    f"{row['pairwise'] * 1e6:>11.1f} us {row['numpy'] * 1e6:>8.1f} us {ratio:>8.1f}x"
                )
                print(line + (f" {row['faiss'] * 1e6:>10.1f} us" if faiss else ""))
                if (nq, topk, nodes) == TARGET[:3]:
                    target_met = ratio >= TARGET[3]
    nq, topk, nodes, _ = TARGET
    row = bench_merge(rng, nq, topk, nodes, ties=True)
    print(
        f"tie-heavy (integer distances) nq={nq} topk={topk} nodes={nodes}: pairwise {row['pairwise'] * 1e6:.1f} us, "
        f"merge_topk {row['numpy'] * 1e6:.1f} us, {row['pairwise'] / row['numpy']:.1f}x"
    )
    return target_met


def print_encoding(rng: np.random.Generator) -> None:
    nq, k = 100, 100
    ids = rng.integers(0, 2**61, (nq, k))
    ids[:, 90:] = -1  # some padded rows: negative ids take 10 bytes
    distances = rng.random((nq, k)).astype(np.float32)

    def with_extend() -> bytes:
        reply = milvus_pb2.TopKQueryResult(row_num=nq)
        reply.ids.extend(ids.ravel().tolist())
        reply.distances.extend(distances.ravel().tolist())
        return reply.SerializeToString()

    encoded = encode_topk_result(ids, distances)
    assert with_extend() == encoded
    extend_cost = median_seconds(with_extend)
    encode_cost = median_seconds(lambda: encode_topk_result(ids, distances))
    decode_cost = median_seconds(lambda: decode_topk_result(encoded))
    print(f"\nTopKQueryResult of nq*k = {nq * k} (10% padding), median per call")
    print(f"  protobuf message + .extend(tolist()) + serialize: {extend_cost * 1e6:8.1f} us")
    print(
        f"  encode_topk_result (packed floats + vectorised varints): {encode_cost * 1e6:8.1f} us"
        f"  ({extend_cost / encode_cost:.1f}x faster)"
    )
    print(f"  decode_topk_result (upb parse + numpy buffers): {decode_cost * 1e6:8.1f} us")


def main() -> int:
    rng = np.random.default_rng(2024)
    target_met = print_merge_table(rng)
    print_encoding(rng)
    nq, topk, nodes, ratio = TARGET
    print(
        f"\ntarget: nq={nq} topk={topk} nodes={nodes} at least {ratio:.0f}x faster: "
        f"{'met' if target_met else 'NOT met'}"
    )
    return 0 if target_met else 1


if __name__ == "__main__":
    sys.exit(main())

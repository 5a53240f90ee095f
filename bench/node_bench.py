"""The compact node alone: insert rows/s and search QPS of a `single` node on 100k x 128, FLAT and IVF_FLAT,
then recall of the approximate index types on 20k x 64.

Inserts go in batches of 10k rows (acknowledged after the WAL fsync), each batch flushed into its
own segment (10 segments of 5 MB, above the 4 MB index_file_size, so IVF_FLAT indexes every one).
Searches are pre-serialized requests sent one at a time (closed loop, bounded in seconds and
count) for nq = 1 and 10, topk = 10; the IVF_FLAT run also reports recall@10 against the FLAT answers.

The recall table builds IVF_FLAT, HNSW and ANNOY (several n_trees / search_k settings) over one
20k x 64 segment and compares 100 queries' top 10 with an exact numpy oracle.

    python -m bench.node_bench [--rows 100000] [--seconds 3] [--nlist 256] [--nprobe 16] [--part all|recall]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import NodeProcess
from tests.support.stubs import OPTIONS, milvus_stub, records, search_param

DIM, SEGMENTS, TOPK = 128, 10, 10


def load(address: str, vectors: np.ndarray) -> tuple[float, float]:
    """Insert and flush SEGMENTS batches; returns (insert rows/s, flush seconds per segment)."""
    requests = [
        pb.InsertParam(collection_name="bench", row_record_array=records(part)).SerializeToString()
        for part in np.array_split(vectors, SEGMENTS)
    ]
    with milvus_stub(address) as stub, grpc.insecure_channel(address, options=OPTIONS) as channel:
        status = stub.CreateCollection(
            pb.CollectionSchema(collection_name="bench", dimension=DIM, index_file_size=4, metric_type=1)
        )
        assert status.error_code == 0, status
        insert = channel.unary_unary("/milvus.grpc.MilvusService/Insert", response_deserializer=pb.VectorIds.FromString)
        inserting = flushing = 0.0
        for request in requests:
            t0 = time.perf_counter()
            assert insert(request, timeout=120).status.error_code == 0
            t1 = time.perf_counter()
            assert stub.Flush(pb.FlushParam(collection_name_array=["bench"]), timeout=120).error_code == 0
            inserting += t1 - t0
            flushing += time.perf_counter() - t1
    return len(vectors) / inserting, flushing / SEGMENTS


def measure(
    address: str, queries: np.ndarray, params: str, seconds: float, budget: int = 100_000, collection: str = "bench"
) -> dict:
    request = search_param(collection, queries, TOPK, params=params).SerializeToString()
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        search = channel.unary_unary(
            "/milvus.grpc.MilvusService/Search", response_deserializer=pb.TopKQueryResult.FromString
        )
        reply = search(request, timeout=60)  # warm-up: loads segments into the cache
        assert reply.status.error_code == 0, reply.status
        latencies = []
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at and len(latencies) < budget:
            t0 = time.perf_counter()
            search(request, timeout=60)
            latencies.append(time.perf_counter() - t0)
    return {
        "qps": len(latencies) / sum(latencies),
        "p50_ms": statistics.median(latencies) * 1e3,
        "ids": np.array(reply.ids).reshape(len(queries), TOPK),
    }


RECALL_ROWS, RECALL_DIM, RECALL_QUERIES = 20_000, 64, 100
# (index type, name, build params, [search params]); ANNOY's search_k is the number of tree nodes visited
RECALL_RUNS = [
    (2, "IVF_FLAT", {"nlist": 128}, [{"nprobe": 8}, {"nprobe": 32}]),
    (11, "HNSW", {"M": 16, "efConstruction": 200}, [{"ef": 64}, {"ef": 256}]),
    (12, "ANNOY", {"n_trees": 8}, [{"search_k": 1000}, {"search_k": 10000}]),
    (12, "ANNOY", {"n_trees": 32}, [{"search_k": 1000}, {"search_k": 10000}, {"search_k": 40000}]),
    (12, "ANNOY", {"n_trees": 128}, [{"search_k": 10000}, {"search_k": 40000}]),
]


def recall_table(seconds: float) -> None:
    """Recall@10 against the exact oracle and single-query QPS per index type and setting."""
    import json

    rng = np.random.default_rng(1)
    vectors = rng.random((RECALL_ROWS, RECALL_DIM), dtype=np.float32)
    queries = rng.random((RECALL_QUERIES, RECALL_DIM), dtype=np.float32)
    exact_dist = (queries.astype(np.float64) ** 2).sum(1)[:, None] - 2 * queries.astype(np.float64) @ vectors.T.astype(
        np.float64
    )
    exact_dist += (vectors.astype(np.float64) ** 2).sum(1)[None, :]
    truth = np.argsort(exact_dist, axis=1)[:, :TOPK]  # row positions; ids are positions below
    rows = []
    with tempfile.TemporaryDirectory(prefix="node-bench-recall-") as tmp:
        data = Path(tmp)
        args = ["--auto-flush-interval", "0", "--merge-after", "-1"]
        meta_uri = f"sqlite:///{data}/meta.sqlite"
        with (
            NodeProcess("single", meta_uri, data / "data", log_dir=data, extra_args=args) as node,
            milvus_stub(node.address) as stub,
        ):
            schema = pb.CollectionSchema(
                collection_name="bench", dimension=RECALL_DIM, index_file_size=1024, metric_type=1
            )
            assert stub.CreateCollection(schema).error_code == 0
            insert = pb.InsertParam(
                collection_name="bench", row_record_array=records(vectors), row_id_array=range(RECALL_ROWS)
            )
            assert stub.Insert(insert, timeout=120).status.error_code == 0
            assert stub.Flush(pb.FlushParam(collection_name_array=["bench"]), timeout=120).error_code == 0
            for index_type, name, build, searches in RECALL_RUNS:
                t0 = time.perf_counter()
                status = stub.CreateIndex(
                    pb.IndexParam(
                        collection_name="bench",
                        index_type=index_type,
                        extra_params=[pb.KeyValuePair(key="params", value=json.dumps(build))],
                    ),
                    timeout=900,
                )
                build_s = time.perf_counter() - t0
                assert status.error_code == 0, status
                for search in searches:
                    params = json.dumps(search)
                    reply = stub.Search(search_param("bench", queries, TOPK, params=params), timeout=300)
                    assert reply.status.error_code == 0, reply.status
                    found = np.array(reply.ids).reshape(RECALL_QUERIES, TOPK)
                    recall = np.mean([len(set(a) & set(b)) / TOPK for a, b in zip(found, truth, strict=True)])
                    qps = measure(node.address, queries[:1], params, seconds, collection="bench")["qps"]
                    rows.append((name, json.dumps(build), params, build_s, recall, qps))
    print(
        f"# recall: single node, one segment of {RECALL_ROWS} x {RECALL_DIM} float32 L2 (uniform random), "
        f"{RECALL_QUERIES} queries, topk {TOPK}, exact numpy oracle"
    )
    print(f"{'index':<9} {'build params':<34} {'search params':<22} {'build s':>7} {'recall@10':>9} {'QPS nq=1':>8}")
    for name, build, params, build_s, recall, qps in rows:
        print(f"{name:<9} {build:<34} {params:<22} {build_s:>7.1f} {recall:>9.3f} {qps:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--part", choices=["all", "recall"], default="all", help="recall: only the recall table")
    args = parser.parse_args()
    if args.part == "recall":
        recall_table(min(args.seconds, 1.0))
        return
    rng = np.random.default_rng(0)
    vectors = rng.random((args.rows, DIM), dtype=np.float32)
    queries = {nq: rng.random((nq, DIM), dtype=np.float32) for nq in (1, 10)}
    with tempfile.TemporaryDirectory(prefix="node-bench-") as tmp:
        data = Path(tmp)
        with NodeProcess(
            "single",
            f"sqlite:///{data}/meta.sqlite",
            data / "data",
            log_dir=data,
            extra_args=["--auto-flush-interval", "0", "--merge-after", "-1"],
        ) as node:
            rows_per_s, flush_s = load(node.address, vectors)
            flat = {nq: measure(node.address, q, "{}", args.seconds) for nq, q in queries.items()}
            with milvus_stub(node.address) as stub:
                t0 = time.perf_counter()
                status = stub.CreateIndex(
                    pb.IndexParam(
                        collection_name="bench",
                        index_type=2,
                        extra_params=[pb.KeyValuePair(key="params", value=f'{{"nlist": {args.nlist}}}')],
                    ),
                    timeout=600,
                )
                build_s = time.perf_counter() - t0
                assert status.error_code == 0, status
            params = f'{{"nprobe": {args.nprobe}}}'
            ivf = {nq: measure(node.address, q, params, args.seconds) for nq, q in queries.items()}

    print(
        f"# node bench: single node, {args.rows} x {DIM} float32 L2 in {SEGMENTS} segments, topk {TOPK}, "
        f"one request in flight ({platform.node()}, Python {platform.python_version()})"
    )
    print(
        f"insert: {rows_per_s:,.0f} rows/s (batches of {args.rows // SEGMENTS}, WAL fsync per batch); "
        f"flush: {flush_s * 1e3:.0f} ms per segment"
    )
    print(f"IVF_FLAT build (nlist {args.nlist}, {SEGMENTS} segments): {build_s:.1f} s")
    print(f"{'index':<10} {'nq':>4} {'QPS':>8} {'p50 ms':>8} {'recall@10 vs FLAT':>18}")
    for name, runs in (("FLAT", flat), (f"IVF_FLAT/{args.nprobe}", ivf)):
        for nq, run in runs.items():
            hits = np.mean([len(set(a) & set(b)) / TOPK for a, b in zip(run["ids"], flat[nq]["ids"], strict=True)])
            print(f"{name:<10} {nq:>4} {run['qps']:>8.0f} {run['p50_ms']:>8.2f} {hits:>18.3f}")
    print()
    recall_table(min(args.seconds, 1.0))


if __name__ == "__main__":
    main()

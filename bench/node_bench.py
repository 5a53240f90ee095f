"""The compact node alone: insert rows/s and search QPS of a `single` node on 100k x 128, FLAT and IVF_FLAT.

Inserts go in batches of 10k rows (acknowledged after the WAL fsync), each batch flushed into its
own segment (10 segments of 5 MB, above the 4 MB index_file_size, so IVF_FLAT indexes every one).
Searches are pre-serialized requests sent one at a time (closed loop, bounded in seconds and
count) for nq = 1 and 10, topk = 10; the IVF_FLAT run also reports recall@10 against the FLAT answers.

    python bench/node_bench.py [--rows 100000] [--seconds 3] [--nlist 256] [--nprobe 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from milvus_grpc import milvus_pb2 as pb  # noqa: E402
from tests.support.processes import NodeProcess  # noqa: E402
from tests.support.stubs import OPTIONS, milvus_stub, records, search_param  # noqa: E402

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


def measure(address: str, queries: np.ndarray, params: str, seconds: float, budget: int = 100_000) -> dict:
    request = search_param("bench", queries, TOPK, params=params).SerializeToString()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

"""Searches under faults: exact-checked searches through the proxy while a nemesis breaks nodes.

A cluster of one writable and 3 read-only nodes (one SQLite meta, one data directory) behind a
proxy with its shipped defaults (hedging on, partial results off). Three collections: float L2
with two partitions, float IP, binary JACCARD; each in several segments. Client threads send a
steady stream of searches (random pre-computed queries, some restricted to a partition) with a
10 s client deadline, and check every answer against a brute-force oracle. Meanwhile a scripted
nemesis runs one fault kind per phase:

  none       no fault (the baseline)
  ro-pause   SIGSTOP of the busiest read-only node, SIGCONT after a while
  ro-kill    SIGKILL of a read-only node, restarted on the same port after a while
  ro-slow    one read-only node slowed by SIGSTOP/SIGCONT bursts (stopped 200 ms of every 500 ms)
  wo-pause   SIGSTOP of the writable node
  wo-kill    SIGKILL of the writable node, restarted

Each phase ends once every node is healthy again in the proxy's eyes (bounded), so its recovery
counts in it. Per phase: searches, failures (an error status or exception), wrong results (OK
but not the oracle's answer), p50/p99/max latency, hedges sent and won, node calls; then the
acceptance checks. Bounded in time (about two minutes plus start-up).

    python -m bench.chaos_bench [--clients 3] [--baseline 25] [--fault 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import (
    MishardsProcess,
    NodeProcess,
)
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.milvus_schema import MetricType

DIM = 32
BINARY_DIM = 128
ROWS = 3000
SEGMENTS = 10
TOPK = 10
NQ = 2
QUERY_SETS = 12
CLIENT_DEADLINE_S = 10.0
SETTLE_LIMIT_S = 30.0


@dataclass
class Query:
    collection: str
    tags: tuple[str, ...]
    request: pb.SearchParam
    queries: np.ndarray
    rows: dict[int, np.ndarray]  # id -> vector, of the rows this query may return
    metric: int
    expected: list[list[tuple[int, float]]]


@dataclass
class Sample:
    phase: str
    ok: bool
    wrong: bool
    seconds: float
    detail: str = ""


@dataclass
class Phase:
    name: str
    started_stats: dict = field(default_factory=dict)
    ended_stats: dict = field(default_factory=dict)


def load_collections(address: str, rng: np.random.Generator) -> list[Query]:
    """Create and fill the three collections; the pool of queries with their expected answers."""
    queries: list[Query] = []
    with milvus_stub(address) as stub:
        for name, metric, binary, tags in (
            ("chaos_l2", MetricType.L2, False, ("a", "b")),
            ("chaos_ip", MetricType.IP, False, ()),
            ("chaos_bin", MetricType.JACCARD, True, ()),
        ):
            dim = BINARY_DIM if binary else DIM
            status = stub.CreateCollection(
                pb.CollectionSchema(collection_name=name, dimension=dim, index_file_size=1024, metric_type=metric)
            )
            assert status.error_code == 0, status
            for tag in tags:
                status = stub.CreatePartition(pb.PartitionParam(collection_name=name, tag=tag))
                assert status.error_code == 0, status
            if binary:
                vectors = rng.integers(0, 256, (ROWS, dim // 8), dtype=np.uint8)
            else:
                vectors = rng.random((ROWS, dim)).astype(np.float32)
            ids = np.arange(ROWS, dtype=np.int64) * 7 + 3
            row_tag = np.empty(ROWS, dtype=object)
            for segment, part in enumerate(np.array_split(np.arange(ROWS), SEGMENTS)):
                tag = (tags + ("",))[segment % (len(tags) + 1)] if tags else ""
                row_tag[part] = tag
                reply = stub.Insert(
                    pb.InsertParam(
                        collection_name=name,
                        row_record_array=records(vectors[part]),
                        row_id_array=ids[part].tolist(),
                        partition_tag=tag,
                    ),
                    timeout=60,
                )
                assert reply.status.error_code == 0, reply.status
                assert stub.Flush(pb.FlushParam(collection_name_array=[name]), timeout=60).error_code == 0
            for _ in range(QUERY_SETS):
                restrict = tags[: int(rng.integers(0, 2))] if tags and rng.random() < 0.5 else ()
                mask = np.isin(row_tag, list(restrict)) if restrict else np.ones(ROWS, dtype=bool)
                if binary:
                    q = rng.integers(0, 256, (NQ, dim // 8), dtype=np.uint8)
                else:
                    q = rng.random((NQ, dim)).astype(np.float32)
                queries.append(
                    Query(
                        name,
                        restrict,
                        search_param(name, q, TOPK, tags=restrict),
                        q,
                        {int(i): v for i, v in zip(ids[mask], vectors[mask], strict=True)},
                        metric,
                        oracle.brute_force(metric, q, vectors[mask], ids[mask], TOPK),
                    )
                )
    return queries


def check(query: Query, reply: pb.TopKQueryResult) -> str:
    """'' when the reply is the oracle's answer. Ties at the k-th distance may pick other ids, so
    each returned id must have the distance reported for it and the distances must be the oracle's."""
    got_ids, got_distances = result_rows(reply)
    if len(got_ids) != len(query.expected):
        return f"{len(got_ids)} rows for {len(query.expected)} queries"
    for row, (ids, distances, want) in enumerate(zip(got_ids, got_distances, query.expected, strict=True)):
        if len(ids) != len(want) or len(set(ids)) != len(ids):
            return f"row {row}: {len(ids)} ids (expected {len(want)}, distinct)"
        if not np.allclose(distances, [d for _, d in want], rtol=1e-5, atol=1e-4):
            return f"row {row}: distances {distances[:3]}... != {[d for _, d in want][:3]}..."
        for vector_id, distance in zip(ids, distances, strict=True):
            vector = query.rows.get(vector_id)
            if vector is None:
                return f"row {row}: id {vector_id} is not in the searched rows"
            true = oracle.brute_force(query.metric, query.queries[row : row + 1], vector[None], [vector_id], 1)[0]
            if not true or not np.isclose(true[0][1], distance, rtol=1e-5, atol=1e-4):
                return f"row {row}: id {vector_id} reported at {distance}, truly at {true}"
    return ""


def client_loop(address: str, queries: list[Query], phase: list[str], stop: threading.Event, out: list, seed: int):
    rng = np.random.default_rng(seed)
    with milvus_stub(address) as stub:
        while not stop.is_set():
            query = queries[int(rng.integers(len(queries)))]
            label = phase[0]
            started = time.monotonic()
            try:
                reply = stub.Search(query.request, timeout=CLIENT_DEADLINE_S)
            except Exception as exc:  # noqa: BLE001 - a transport error is a failed search
                out.append(Sample(label, False, False, time.monotonic() - started, repr(exc)[:200]))
                continue
            elapsed = time.monotonic() - started
            if reply.status.error_code != 0:
                out.append(Sample(label, False, False, elapsed, reply.status.reason[:200]))
                continue
            problem = check(query, reply)
            out.append(Sample(label, True, bool(problem), elapsed, problem))


def conn_stats(address: str) -> dict:
    with milvus_stub(address) as stub:
        return json.loads(stub.Cmd(pb.Command(cmd="conn_stats"), timeout=5).string_reply)


def totals(stats: dict) -> dict[str, int]:
    nodes = [*stats["readonly"].values(), stats["writable"]]
    return {key: sum(node[key] for node in nodes) for key in ("calls", "hedges", "hedges_won", "ejections")}


def wait_all_healthy(address: str, limit_s: float = SETTLE_LIMIT_S) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        stats = conn_stats(address)
        if len(stats["readonly"]) == 3 and all(n["healthy"] for n in [*stats["readonly"].values(), stats["writable"]]):
            return True
        time.sleep(0.25)
    return False


def busiest(address: str, nodes: list[NodeProcess]) -> NodeProcess:
    routed = {name: node["files_routed"] for name, node in conn_stats(address)["readonly"].items()}
    return next(node for node in nodes if node.address == max(routed, key=routed.get))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3, help="client threads searching at once")
    parser.add_argument("--baseline", type=float, default=25.0, help="seconds without faults")
    parser.add_argument("--fault", type=float, default=10.0, help="seconds each fault lasts")
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="chaos-"))
    meta = f"sqlite:///{base}/meta.sqlite"
    data = base / "data"
    data.mkdir()
    logs = base / "logs"
    procs: list = []
    stop = threading.Event()
    samples: list[Sample] = []
    phase = ["setup"]
    phases: list[Phase] = []
    threads: list[threading.Thread] = []
    try:
        writable = NodeProcess("writable", meta, data, log_dir=logs).start()
        procs.append(writable)
        readonly = [NodeProcess("readonly", meta, data, log_dir=logs).start() for _ in range(3)]
        procs += readonly
        proxy = MishardsProcess(
            woserver=writable.address,
            meta_uri=meta,
            ro_addresses=[n.address for n in readonly],
            log_dir=logs,
            extra_env={"TIMEOUT": "60", "LOG_LEVEL": "WARNING"},
        ).start()
        procs.append(proxy)
        print(f"cluster up under {base}; loading {3 * ROWS} rows in {3 * SEGMENTS} segments", flush=True)
        queries = load_collections(proxy.address, np.random.default_rng(42))

        def enter(name: str) -> None:
            if phases:
                phases[-1].ended_stats = totals(conn_stats(proxy.address))
            phases.append(Phase(name, totals(conn_stats(proxy.address))))
            phase[0] = name
            print(f"{time.strftime('%H:%M:%S')} phase {name}", flush=True)

        enter("warm-up")
        threads = [
            threading.Thread(target=client_loop, args=(proxy.address, queries, phase, stop, samples, seed), daemon=True)
            for seed in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(3)

        enter("none")
        time.sleep(args.baseline)

        victim = busiest(proxy.address, readonly)
        enter("ro-pause")
        victim.pause()
        time.sleep(args.fault)
        victim.resume()
        wait_all_healthy(proxy.address)

        victim = busiest(proxy.address, readonly)
        enter("ro-kill")
        victim.kill()
        time.sleep(args.fault)
        victim.start()
        wait_all_healthy(proxy.address)

        victim = busiest(proxy.address, readonly)
        enter("ro-slow")
        end = time.monotonic() + args.fault + 2
        while time.monotonic() < end:
            os.kill(victim.pid, signal.SIGSTOP)
            time.sleep(0.2)
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.3)
        wait_all_healthy(proxy.address)

        enter("wo-pause")
        writable.pause()
        time.sleep(args.fault)
        writable.resume()
        wait_all_healthy(proxy.address)

        enter("wo-kill")
        writable.kill()
        time.sleep(args.fault / 2)
        writable.start()
        wait_all_healthy(proxy.address)
        enter("end")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_DEADLINE_S + 5)
        for proc in reversed(procs):
            proc.resume()
            proc.stop()
        if args.keep:
            print(f"data and logs kept under {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    return report(samples, phases)


def report(samples: list[Sample], phases: list[Phase]) -> int:
    header = ("fault", "searches", "failed", "wrong", "p50 ms", "p99 ms", "max ms", "node calls", "hedges", "won")
    rows = []
    by_phase: dict[str, list[Sample]] = {}
    for sample in samples:
        by_phase.setdefault(sample.phase, []).append(sample)
    summary: dict[str, dict] = {}
    for p in phases:
        if p.name in ("warm-up", "end") or not p.ended_stats:
            continue
        got = by_phase.get(p.name, [])
        latencies = [s.seconds * 1000 for s in got]
        delta = {key: p.ended_stats[key] - p.started_stats[key] for key in p.started_stats}
        summary[p.name] = {
            "searches": len(got),
            "failed": sum(not s.ok for s in got),
            "wrong": sum(s.wrong for s in got),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            **delta,
        }
        rows.append(
            (
                p.name,
                str(len(got)),
                str(summary[p.name]["failed"]),
                str(summary[p.name]["wrong"]),
                f"{percentile(latencies, 50):.1f}",
                f"{percentile(latencies, 99):.1f}",
                f"{summary[p.name]['max']:.1f}",
                str(delta["calls"]),
                str(delta["hedges"]),
                str(delta["hedges_won"]),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    problems = [s for s in samples if s.phase not in ("warm-up", "end") and (not s.ok or s.wrong)]
    for sample in problems[:10]:
        print(
            f"  {sample.phase}: {'failed' if not sample.ok else 'wrong'} after {sample.seconds:.2f} s: {sample.detail}"
        )

    counted = sum(v["searches"] for v in summary.values())
    baseline = summary.get("none", {})
    limit = 3 * baseline.get("p99", float("nan")) + 500
    hedge_share = baseline.get("hedges", 0) / max(baseline.get("calls", 0), 1)
    checks = [
        (f"at least 2000 searches ({counted})", counted >= 2000),
        ("0 failed and 0 wrong searches", all(v["failed"] == 0 and v["wrong"] == 0 for v in summary.values())),
        (
            f"max latency within 3 x no-fault p99 + 0.5 s ({limit:.0f} ms)",
            all(v["max"] <= limit for v in summary.values()),
        ),
        (f"hedges at most 10% of node calls without faults ({100 * hedge_share:.1f}%)", hedge_share <= 0.10),
    ]
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

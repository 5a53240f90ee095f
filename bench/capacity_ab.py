"""Proxy capacity of this checkout against another git revision, in one interleaved run.

A change that touches the search path must keep the proxy's CPU per search (the capacity figure
of `search_bench.py`); on a noisy machine only figures from the same run compare. This starts two
proxies over the same 2 scripted fake nodes that answer at once (so the proxy is what saturates):
one from this checkout, one from REV checked out into a temporary git worktree, and measures them
in alternation, round after round.

    python -m bench.capacity_ab REV [--rounds 5] [--in-flight 32] [--requests 4000] [--transport http2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.search_bench import DIM, _saturate, cpu_seconds, fake_nodes
from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import (
    MishardsProcess,
    NodeProcess,
)
from tests.support.stubs import records

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare with, e.g. HEAD~1 or main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4000, help="per proxy and round")
    parser.add_argument("--transport", default="http2", choices=("http2", "grpcio"))
    args = parser.parse_args()

    request = pb.SearchParam(
        collection_name="bench",
        query_record_array=records(np.random.default_rng(1).random((1, DIM)).astype(np.float32)),
        topk=10,
        extra_params=[pb.KeyValuePair(key="params", value="{}")],
    ).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="mishards-ab-") as tmp:
        base = Path(tmp)
        other = base / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.rev], check=True)
        try:
            return _compare(args, request, base, other)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


def _compare(args, request: bytes, base: Path, other: Path) -> int:
    data = base / "data"
    meta = f"sqlite:///{data}/meta.sqlite"
    # No background merge: it would fold the 4 segments into one about 10 s in, so the rounds
    # before it scatter each search over both fake nodes and the rounds after it over one, and
    # whichever proxy is measured first in those rounds pays more (seen: 1.20 against 1.08).
    writable = NodeProcess(
        role="writable", data_dir=data, meta_uri=meta, log_dir=base, env={"MILVUS_NODE_MERGE_AFTER": "-1"}
    )
    fake, ports = fake_nodes(base)
    env = {"LOG_LEVEL": "WARNING", "TIMEOUT": "60", "RPC_TRANSPORT": args.transport}
    with writable, fake:
        from tests.support.stubs import milvus_stub

        with milvus_stub(writable.address) as stub:
            schema = pb.CollectionSchema(collection_name="bench", dimension=DIM, index_file_size=1024, metric_type=1)
            assert stub.CreateCollection(schema).error_code == 0
            vectors = np.random.default_rng(2).random((2000, DIM)).astype(np.float32)
            for part in np.array_split(np.arange(len(vectors)), 4):
                reply = stub.Insert(pb.InsertParam(collection_name="bench", row_record_array=records(vectors[part])))
                assert reply.status.error_code == 0
                assert stub.Flush(pb.FlushParam(collection_name_array=["bench"])).error_code == 0
        proxies = {}
        for label, root in (("this checkout", ROOT), (args.rev, other)):
            proxy = MishardsProcess(
                woserver=writable.address,
                meta_uri=meta,
                ro_addresses=[f"127.0.0.1:{port}" for port in ports],
                log_dir=base,
                extra_env=env,
            )
            proxy.cwd = root  # `python -m mishards` from that tree
            proxies[label] = proxy.start()
        try:
            results: dict[str, list[tuple[float, float]]] = {label: [] for label in proxies}
            for round_number in range(args.rounds):
                order = list(proxies.items())
                for label, proxy in order if round_number % 2 == 0 else order[::-1]:
                    cpu0 = cpu_seconds(proxy.pid)
                    wall = asyncio.run(_saturate(proxy.address, request, args.in_flight, args.requests))
                    results[label].append(
                        ((cpu_seconds(proxy.pid) - cpu0) / args.requests * 1000, args.requests / wall)
                    )
        finally:
            for proxy in proxies.values():
                proxy.stop()
    print(
        f"proxy CPU per search, nq=1 topk=10, {args.in_flight} in flight, 2 fake nodes, {args.transport}, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"{'proxy':<20} {'QPS':>7} {'CPU ms/search':>14} {'range':>13}")
    medians = {}
    for label, runs in results.items():
        cpu = sorted(r[0] for r in runs)
        medians[label] = statistics.median(cpu)
        qps = statistics.median(r[1] for r in runs)
        print(f"{label:<20} {qps:>7.0f} {medians[label]:>14.3f} {cpu[0]:>6.3f}-{cpu[-1]:.3f}")
    this, that = medians.values()
    print(f"ratio this/{args.rev}: {this / that:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

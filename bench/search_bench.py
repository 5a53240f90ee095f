"""Search latency, throughput and proxy CPU: one `single` node vs Mishards over 1 and 2 read-only nodes.

The same data (N x DIM float32, L2, stored as 10 segments) is loaded into a `single` node and into
a cluster (writable + 2 read-only nodes on one SQLite meta); two proxies front the cluster, one
over a single read-only node and one over both. The same stream of pre-serialized searches is
sent to each target, one request in flight, for each (nq, topk). The proxy's CPU time per search
is read from /proc/<pid>/stat around each run. Everything runs on this machine over loopback,
bounded in requests and seconds.

    python -m bench.search_bench [--rows 100000] [--seconds 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import (
    ManagedProcess,
    MishardsProcess,
    NodeProcess,
    cmd_version_probe,
    free_port,
)
from tests.support.stubs import OPTIONS, milvus_stub, records

DIM = 128
SEGMENTS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def load(address: str, vectors: np.ndarray, ids: np.ndarray) -> None:
    with milvus_stub(address) as stub:
        status = stub.CreateCollection(
            pb.CollectionSchema(collection_name="bench", dimension=DIM, index_file_size=1024, metric_type=1)
        )
        assert status.error_code == 0, status
        for part in np.array_split(np.arange(len(vectors)), SEGMENTS):
            reply = stub.Insert(
                pb.InsertParam(
                    collection_name="bench", row_record_array=records(vectors[part]), row_id_array=ids[part].tolist()
                ),
                timeout=120,
            )
            assert reply.status.error_code == 0, reply.status
            assert stub.Flush(pb.FlushParam(collection_name_array=["bench"]), timeout=120).error_code == 0


def run(address: str, request: bytes, seconds: float, max_requests: int, pid: int | None) -> dict:
    channel = grpc.insecure_channel(address, options=OPTIONS)
    search = channel.unary_unary("/milvus.grpc.MilvusService/Search")
    try:
        for _ in range(3):  # warm-up: connections, caches, reloads
            reply = pb.TopKQueryResult.FromString(search(request, timeout=60))
            assert reply.status.error_code == 0, reply.status
        latencies = []
        cpu0 = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        stop_at = start + seconds
        while time.perf_counter() < stop_at and len(latencies) < max_requests:
            t0 = time.perf_counter()
            search(request, timeout=60)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0 if pid else float("nan")
    finally:
        channel.close()
    ordered = sorted(latencies)
    return {
        "n": len(latencies),
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "qps": len(latencies) / wall,
        "cpu_ms": cpu / len(latencies) * 1000 if pid else float("nan"),
    }


# Where a profile sample's time is booked: the deepest frame that matches decides.
_COMPONENTS = [
    ("meta DB query", ("mishards/meta.py", "sqlalchemy/", "sqlite3")),
    ("merge + result codecs", ("mishards/core/merge.py", "mishards/core/wire.py")),
    ("routing (ring, reload check)", ("mishards/router/", "mishards/core/ring.py", "ReloadTracker")),
    ("HTTP/2 + gRPC framing, HPACK", ("mishards/protocol/http2.py", "mishards/protocol/grpc_h2.py", "hpack/")),
    ("transport adapters (asyncio side)", ("mishards/protocol/server.py",)),
    ("service + scatter logic", ("mishards/service.py", "mishards/search.py")),
    ("socket writes", ("_SelectorSocketTransport.write",)),
    ("grpcio (writable channel, health probes)", ("grpc/", "cygrpc", "threading.py")),
]


def profile(pid: int, load, seconds: float, out: Path) -> str:
    """py-spy samples the proxy while `load()` runs; the CPU share of each component and the top
    frames by own time."""
    raw = out / "proxy-profile.txt"
    sampler = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--rate",
            "250",
            "--threads",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    load()
    sampler.wait(timeout=seconds + 30)
    own: dict[str, int] = {}
    components: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        booked = "asyncio event loop"
        for frame in reversed(frames):
            match = next((name for name, marks in _COMPONENTS if any(m in frame for m in marks)), None)
            if match is not None:
                booked = match
                break
        components[booked] = components.get(booked, 0) + int(count)
    lines = ["share of the proxy's CPU by component:"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in sorted(components.items(), key=lambda kv: -kv[1])]
    lines.append("top frames by own time:")
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines)


# The cheapest possible grpc.aio proxy: one raw-bytes handler that calls two nodes and returns one
# reply. Its CPU per request is the floor any Python fan-out over 2 nodes pays on this machine.
_FLOOR_PROXY = r"""
import asyncio, sys, grpc
async def main():
    calls = [grpc.aio.insecure_channel(a).unary_unary("/milvus.grpc.MilvusService/Cmd") for a in sys.argv[1:3]]
    async def handle(request, context):
        first, second = calls[0](request, timeout=5), calls[1](request, timeout=5)
        reply = await first
        await second
        return reply
    handler = grpc.method_handlers_generic_handler(
        "milvus.grpc.MilvusService", {"Cmd": grpc.unary_unary_rpc_method_handler(handle)})
    server = grpc.aio.server(handlers=[handler])
    server.add_insecure_port("127.0.0.1:" + sys.argv[3])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def grpc_floor(node_a: str, node_b: str, requests: int = 1000) -> float:
    """CPU ms per request of the minimal 2-node fan-out proxy (`Cmd version` to both nodes)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FLOOR_PROXY, node_a, node_b, str(port)])
    try:
        probe = cmd_version_probe(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while not probe():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the floor proxy did not start")
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/milvus.grpc.MilvusService/Cmd")
        request = pb.Command(cmd="version").SerializeToString()
        for _ in range(50):
            call(request, timeout=10)
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(requests):
            call(request, timeout=10)
        channel.close()
        return (cpu_seconds(proc.pid) - cpu0) / requests * 1000
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def _saturate(address: str, request: bytes, in_flight: int, requests: int) -> float:
    """`requests` searches with `in_flight` outstanding on one grpc.aio channel; the wall time."""
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        search = channel.unary_unary("/milvus.grpc.MilvusService/Search")
        for _ in range(20):  # warm-up: connections, caches, reloads
            reply = pb.TopKQueryResult.FromString(await search(request, timeout=60))
            assert reply.status.error_code == 0, reply.status
        left = [requests]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                await search(request, timeout=60)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - start


def fake_nodes(base: Path, count: int = 2) -> tuple[ManagedProcess, list[int]]:
    """Scripted fake read-only nodes that answer at once (one process, `count` ports): the proxy is
    what saturates over them."""
    ports = [free_port() for _ in range(count)]
    process = ManagedProcess(
        "fake nodes",
        [sys.executable, "-m", "tests.support.fake_node", *map(str, ports)],
        cmd_version_probe(f"127.0.0.1:{ports[0]}"),
        base / "fake-nodes.log",
    )
    return process, ports


def capacity(
    writable: str, meta: str, base: Path, request: bytes, rounds: int = 3, with_profile: bool = False
) -> list[str]:
    """Proxy CPU per search with 2 scripted fake nodes that answer at once, so the proxy is what
    saturates: the capacity cost, for both RPC transports, 1 and 32 searches in flight (and a
    profile of the http2 proxy at 32 in flight)."""
    fake, ports = fake_nodes(base)
    rows = []
    with fake:
        proxies = {
            transport: MishardsProcess(
                woserver=writable,
                meta_uri=meta,
                ro_addresses=[f"127.0.0.1:{port}" for port in ports],
                log_dir=base,
                extra_env={"LOG_LEVEL": "WARNING", "TIMEOUT": "60", "RPC_TRANSPORT": transport},
            )
            for transport in ("http2", "grpcio")
        }
        for proxy in proxies.values():
            proxy.start()
        try:
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(rounds):  # interleaved, so drifts in machine load hit both alike
                for in_flight, requests in ((1, 1500), (32, 4000)):
                    for transport, proxy in proxies.items():
                        cpu0 = cpu_seconds(proxy.pid)
                        wall = asyncio.run(_saturate(proxy.address, request, in_flight, requests))
                        cpu_ms = (cpu_seconds(proxy.pid) - cpu0) / requests * 1000
                        results.setdefault((transport, in_flight), []).append((cpu_ms, requests / wall))
            for (transport, in_flight), runs in results.items():
                cpu = sorted(r[0] for r in runs)
                qps = statistics.median(r[1] for r in runs)
                rows.append(
                    f"{transport:<9} {in_flight:>9} {qps:>7.0f} {statistics.median(cpu):>12.3f} "
                    f"{cpu[0]:>6.3f}-{cpu[-1]:.3f}"
                )
            if with_profile:
                proxy = proxies["http2"]
                rows.append("\nprofile of the http2 proxy at 32 in flight (py-spy):")
                rows.append(
                    profile(proxy.pid, lambda: asyncio.run(_saturate(proxy.address, request, 32, 12000)), 8, base)
                )
        finally:
            for proxy in proxies.values():
                proxy.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    parser.add_argument("--max-requests", type=int, default=3000, help="per cell")
    parser.add_argument("--profile", action="store_true", help="also sample the proxy with py-spy")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vectors = rng.random((args.rows, DIM)).astype(np.float32)
    ids = np.arange(args.rows, dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="mishards-bench-") as tmp:
        base = Path(tmp)
        (base / "single").mkdir()
        (base / "cluster").mkdir()
        meta = f"sqlite:///{base}/cluster/meta.sqlite"
        with (
            NodeProcess("single", f"sqlite:///{base}/single/meta.sqlite", base / "single", log_dir=base) as single,
            NodeProcess("writable", meta, base / "cluster", log_dir=base) as writable,
            NodeProcess("readonly", meta, base / "cluster", log_dir=base) as ro1,
            NodeProcess("readonly", meta, base / "cluster", log_dir=base) as ro2,
        ):
            print(f"loading {args.rows} x {DIM} vectors as {SEGMENTS} segments into each target ...", flush=True)
            load(single.address, vectors, ids)
            load(writable.address, vectors, ids)
            quiet = {"LOG_LEVEL": "WARNING", "TIMEOUT": "60"}
            with (
                MishardsProcess(
                    woserver=writable.address, meta_uri=meta, ro_addresses=[ro1.address], log_dir=base, extra_env=quiet
                ) as proxy1,
                MishardsProcess(
                    woserver=writable.address,
                    meta_uri=meta,
                    ro_addresses=[ro1.address, ro2.address],
                    log_dir=base,
                    extra_env=quiet,
                ) as proxy2,
            ):
                targets = [
                    ("single node", single.address, None),
                    ("proxy, 1 RO", proxy1.address, proxy1.pid),
                    ("proxy, 2 RO", proxy2.address, proxy2.pid),
                ]
                print(
                    f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}, grpcio {grpc.__version__}"
                )
                print(
                    f"{'target':<13} {'nq':>4} {'topk':>5} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} "
                    f"{'QPS':>7} {'proxy CPU ms/search':>20}"
                )
                for nq in (1, 10, 100):
                    for topk in (10, 100):
                        queries = rng.random((nq, DIM)).astype(np.float32)
                        request = pb.SearchParam(
                            collection_name="bench",
                            query_record_array=records(queries),
                            topk=topk,
                            extra_params=[pb.KeyValuePair(key="params", value="{}")],
                        ).SerializeToString()
                        for label, address, pid in targets:
                            r = run(address, request, args.seconds, args.max_requests, pid)
                            cpu = "" if pid is None else f"{r['cpu_ms']:.3f}"
                            print(
                                f"{label:<13} {nq:>4} {topk:>5} {r['n']:>8} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                                f"{r['qps']:>7.1f} {cpu:>20}",
                                flush=True,
                            )
                request = pb.SearchParam(
                    collection_name="bench",
                    query_record_array=records(rng.random((1, DIM)).astype(np.float32)),
                    topk=10,
                    extra_params=[pb.KeyValuePair(key="params", value="{}")],
                ).SerializeToString()
                print(
                    "\nproxy capacity: CPU per search at nq=1, topk=10 over 2 scripted fake nodes that answer at once"
                    "\n(median of 3 interleaved runs, min-max; RPC_TRANSPORT selects the proxy's gRPC stack)"
                )
                print(f"{'transport':<9} {'in flight':>9} {'QPS':>7} {'CPU ms/search':>12} {'range':>11}")
                for row in capacity(writable.address, meta, base, request, with_profile=args.profile):
                    print(row, flush=True)
                floor = grpc_floor(ro1.address, ro2.address)
                print(
                    f"\ngRPC floor: a minimal grpc.aio proxy fanning one tiny call out to 2 nodes uses "
                    f"{floor:.3f} ms CPU per request on this machine"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

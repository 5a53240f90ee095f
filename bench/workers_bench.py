"""Proxy capacity with worker processes (SERVER_WORKERS): QPS and CPU per search for 1 and 2 workers.

Searches of nq=100, topk=100 (dim 128) over 4 scripted fake read-only nodes that answer cached
replies (bench/search_bench.py `fake_nodes`), so the proxy is what saturates. The load comes from
h2load (Debian's nghttp2-client, a C HTTP/2 load generator), replaying one recorded gRPC Search
request (5-byte gRPC prefix + protobuf), so the client does not eat the cores a Python client
would. Both proxies run side by side and are measured in alternation, round after round, so
drifts in machine load hit both alike. Every reply is checked: one with a grpcio client first,
then the proxy's own counters (/metrics, summed over the workers) must show exactly the searches
h2load completed, none with a non-zero Milvus status.

CPU seconds are read from /proc: the proxy's (supervisor and workers), the fake nodes' and
h2load's own, so the table says how the machine's cores were shared.

    python -m bench.workers_bench [--rounds 5] [--seconds 6] [--connections 16] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.search_bench import cpu_seconds, fake_nodes
from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import LOCALHOST, MishardsProcess, NodeProcess, descendants, free_port
from tests.support.stubs import OPTIONS, milvus_stub, records

ROOT = Path(__file__).resolve().parents[1]

DIM, NQ, TOPK, NODES, SEGMENTS = 128, 100, 100, 4, 16
SEARCH_PATH = "/milvus.grpc.MilvusService/Search"


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and every process under it (a proxy's supervisor and workers)."""
    total = 0.0
    for each in (pid, *descendants(pid)):
        try:
            total += cpu_seconds(each)
        except OSError:
            pass  # ended meanwhile
    return total


def grpc_frame(message: bytes) -> bytes:
    """One gRPC message as sent on the wire: not compressed, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def search_counts(metrics_url: str) -> tuple[float, float]:
    """(Search requests, Search replies with a non-zero Milvus status), summed over the workers."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'^{name}{{method="Search"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return value("mishards_requests_total"), value("mishards_request_errors_total")


@dataclass
class Run:
    requests: int
    wall: float
    proxy_cpu: float
    nodes_cpu: float
    client_cpu: float

    @property
    def qps(self) -> float:
        return self.requests / self.wall


@dataclass
class Proxy:
    workers: int
    process: MishardsProcess
    metrics_url: str


def h2load(args, address: str, body: Path, requests: int) -> tuple[int, float, float, str]:
    """Run h2load; (succeeded requests, its wall seconds, its CPU seconds, its output)."""
    argv = [
        "h2load",
        "-n",
        str(requests),
        "-c",
        str(args.connections),
        "-m",
        str(args.streams),
        "-t",
        "1",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"http://{address}{SEARCH_PATH}",
    ]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:  # bounded wait; wait4 gives the child's own CPU time
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("h2load did not finish in 300 s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{text}")
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", text)
    finished = re.search(r"finished in ([\d.]+)(m?s)", text)
    status_2xx = re.search(r"status codes: (\d+) 2xx", text)
    if not (done and finished and status_2xx):
        raise RuntimeError(f"cannot read h2load's output:\n{text}")
    wall = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    if int(done.group(2)) or int(status_2xx.group(1)) != int(done.group(1)):
        raise RuntimeError(f"h2load saw failed requests or non-200 statuses:\n{text}")
    return int(done.group(1)), wall, usage.ru_utime + usage.ru_stime, text


def measure(args, proxy: Proxy, nodes_pid: int, body: Path, requests: int) -> Run:
    searches0, errors0 = search_counts(proxy.metrics_url)
    proxy0, nodes0 = tree_cpu_seconds(proxy.process.pid), cpu_seconds(nodes_pid)
    done, wall, client_cpu, _ = h2load(args, proxy.process.address, body, requests)
    run = Run(done, wall, tree_cpu_seconds(proxy.process.pid) - proxy0, cpu_seconds(nodes_pid) - nodes0, client_cpu)
    searches1, errors1 = search_counts(proxy.metrics_url)
    if searches1 - searches0 != done or errors1 != errors0:
        raise RuntimeError(
            f"the proxy answered {searches1 - searches0:.0f} searches ({errors1 - errors0:.0f} with an error status) "
            f"for h2load's {done}: not every reply was a successful search"
        )
    return run


def check_one_reply(address: str, request: bytes) -> None:
    """A grpcio client sees a complete, successful result for the recorded request."""
    channel = grpc.insecure_channel(address, options=OPTIONS)
    try:
        reply = pb.TopKQueryResult.FromString(channel.unary_unary(SEARCH_PATH)(request, timeout=60))
    finally:
        channel.close()
    assert reply.status.error_code == 0, reply.status
    assert reply.row_num == NQ and len(reply.ids) == NQ * TOPK, (reply.row_num, len(reply.ids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="per proxy and round (sizes the request count)")
    parser.add_argument("--connections", type=int, default=16, help="h2load connections (spread over the workers)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per connection")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        print(
            "workers capacity: SKIPPED, h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)",
            flush=True,
        )
        return 0

    rng = np.random.default_rng(0)
    request = pb.SearchParam(
        collection_name="bench",
        query_record_array=records(rng.random((NQ, DIM)).astype(np.float32)),
        topk=TOPK,
        extra_params=[pb.KeyValuePair(key="params", value="{}")],
    ).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="mishards-workers-bench-") as tmp:
        base = Path(tmp)
        body = base / "search.grpc"
        body.write_bytes(grpc_frame(request))
        data = base / "data"
        meta = f"sqlite:///{data}/meta.sqlite"
        fake, ports = fake_nodes(base, NODES)
        with NodeProcess("writable", meta, data, log_dir=base) as writable, fake:
            with milvus_stub(writable.address) as stub:
                schema = pb.CollectionSchema(collection_name="bench", dimension=DIM, index_file_size=1, metric_type=1)
                assert stub.CreateCollection(schema).error_code == 0
                vectors = rng.random((SEGMENTS * 50, DIM)).astype(np.float32)
                for part in np.array_split(np.arange(len(vectors)), SEGMENTS):  # files on every fake node
                    reply = stub.Insert(
                        pb.InsertParam(collection_name="bench", row_record_array=records(vectors[part]))
                    )
                    assert reply.status.error_code == 0, reply.status
                    assert stub.Flush(pb.FlushParam(collection_name_array=["bench"])).error_code == 0
            proxies = []
            for workers in (1, 2):
                http_port = free_port()
                process = MishardsProcess(
                    woserver=writable.address,
                    meta_uri=meta,
                    ro_addresses=[f"{LOCALHOST}:{port}" for port in ports],
                    log_dir=base,
                    extra_env={
                        "SERVER_WORKERS": str(workers),
                        "LOG_LEVEL": "WARNING",
                        "TIMEOUT": "60",
                        "METRICS_HOST": LOCALHOST,
                        "METRICS_PORT": str(http_port),
                        "HEDGE_ENABLED": "false",  # every search exactly one call per node
                    },
                )
                proxies.append(Proxy(workers, process, f"http://{LOCALHOST}:{http_port}/metrics"))
            for proxy in proxies:
                proxy.process.start()
            try:
                return report(args, proxies, fake.pid, body, request)
            finally:
                for proxy in proxies:
                    proxy.process.stop()


def report(args, proxies: list[Proxy], nodes_pid: int, body: Path, request: bytes) -> int:
    for proxy in proxies:
        check_one_reply(proxy.process.address, request)
    # size the runs: a short one per proxy first (also the warm-up: connections, caches, reloads);
    # every run sends the same number of searches, so both proxies meet the machine's load alike
    fastest = max(measure(args, proxy, nodes_pid, body, 400).qps for proxy in proxies)
    size = max(1000, int(fastest * args.seconds))
    print(
        f"\nworker processes: nq={NQ} topk={TOPK} dim={DIM}, {NODES} fake nodes answering cached replies, "
        f"h2load {args.connections} connections x {args.streams} streams, {size} searches per run; "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared with other jobs)",
        flush=True,
    )
    results: dict[int, list[Run]] = {proxy.workers: [] for proxy in proxies}
    for _ in range(args.rounds):  # interleaved, so drifts in machine load hit both alike
        for proxy in proxies:
            results[proxy.workers].append(measure(args, proxy, nodes_pid, body, size))
    print(
        f"{'workers':>7} {'QPS':>7} {'range':>11} {'proxy CPU ms/search':>20} {'proxy':>7} {'fake nodes':>10} "
        f"{'h2load':>7} {'wall':>6}   (CPU seconds per run, medians of {args.rounds} runs)"
    )
    medians = {}
    for workers, runs in results.items():
        qps = [r.qps for r in runs]
        cpu_ms = statistics.median(1000 * r.proxy_cpu / r.requests for r in runs)
        medians[workers] = (statistics.median(qps), cpu_ms)
        proxy_s, nodes_s = statistics.median(r.proxy_cpu for r in runs), statistics.median(r.nodes_cpu for r in runs)
        client_s, wall = statistics.median(r.client_cpu for r in runs), statistics.median(r.wall for r in runs)
        print(
            f"{workers:>7} {statistics.median(qps):>7.0f} {min(qps):>5.0f}-{max(qps):<5.0f} {cpu_ms:>20.3f} "
            f"{proxy_s:>7.2f} {nodes_s:>10.2f} {client_s:>7.2f} {wall:>6.2f}"
        )
    two = next(proxy for proxy in proxies if proxy.workers == 2)
    with urllib.request.urlopen(two.metrics_url.replace("/metrics", "/status.json"), timeout=10) as response:
        split = [row["requests"] for row in json.loads(response.read())["workers"]]
    print(f"searches answered by each of the 2 workers (whole run): {' / '.join(map(str, split))}")
    (qps1, cpu1), (qps2, cpu2) = medians[1], medians[2]
    print(
        f"2 workers / 1 worker: QPS x{qps2 / qps1:.2f}, proxy CPU per search x{cpu2 / cpu1:.2f}; "
        f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

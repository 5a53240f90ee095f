"""What one search's meta DB read costs the proxy: SQLite vs MySQL (MariaDB), the ways to read it.

Part 1, the lookup alone (in this process): the file list of a 10-file collection, read on an
asyncio loop the way the proxy reads it, CPU and wall time per lookup, interleaved rounds. Rows:
SQLite inline on the loop (the proxy's SQLite path); MySQL the way the proxy read it before (a
pooled PyMySQL connection with pre-ping, checked out on a worker thread per statement); MySQL
alternatives (held autocommit PyMySQL connection inline, blocking the loop; the same on one
dedicated DB thread); and MySQL the way it reads it now (`mysql_wire`: the held session on the
loop, no thread).

Part 2, the whole proxy: CPU per search at one request in flight through real proxies over 2
scripted fake nodes that answer at once, on a SQLite meta and on a MariaDB meta holding the same
rows, this checkout and (with --baseline REV) another git revision, interleaved rounds, medians.

    scripts/mariadb.sh start   # or MISHARDS_MYSQL_PORT=<free port> scripts/mariadb.sh start
    python -m bench.meta_bench --mysql "$(scripts/mariadb.sh url)" [--baseline REV] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import sqlalchemy as sa

from bench.search_bench import DIM, cpu_seconds
from milvus_grpc import milvus_pb2 as pb
from milvus_node.meta import MetaStore, create_meta_engine
from mishards.meta import _FILES_SQL, MetaReader, create_engine
from tests.support.processes import (
    ManagedProcess,
    MishardsProcess,
    cmd_version_probe,
    free_port,
)
from tests.support.stubs import OPTIONS, records

ROOT = Path(__file__).resolve().parents[1]

FILES = 10
COLLECTION = "bench"


def fill_meta(uri: str) -> None:
    """A collection with FILES searchable files, written as the Milvus node writes them."""
    engine = create_meta_engine(uri)
    store = MetaStore(engine)
    store.ensure_schema(True)
    if store.get_table(COLLECTION) is None:
        store.insert_table(
            table_id=COLLECTION, dimension=DIM, index_file_size=1024, metric_type=1, engine_type=1, index_params="{}"
        )
        for segment in range(FILES):
            store.add_file(
                table_id=COLLECTION,
                segment_id=str(segment),
                file_id=str(segment),
                file_type=1,
                engine_type=1,
                file_size=1,
                row_count=1,
            )
    engine.dispose()


def fresh_database(server_url: str, name: str) -> str:
    engine = sa.create_engine(server_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        connection.execute(sa.text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def proxy_engine(uri: str) -> sa.Engine:
    """The engine the proxy builds with its default settings (pool 100, pre-ping on)."""
    return create_engine(
        uri, echo=False, pool_size=100, pool_recycle=3600, pool_timeout=30, pool_pre_ping=True, max_overflow=0
    )


# ---------------------------------------------------------------------------------- part 1
def lookups(sqlite_uri: str, mysql_uri: str) -> dict[str, Callable[[], Awaitable]]:
    """Each way of reading the file list, as a coroutine factory run on the loop."""
    sqlite_reader = MetaReader(proxy_engine(sqlite_uri))
    held_reader = MetaReader(proxy_engine(mysql_uri))
    pooled_reader = MetaReader(proxy_engine(mysql_uri))
    pooled_reader._session = None  # the path every MySQL read took before the held session

    url = sa.make_url(mysql_uri)
    held = sa.create_engine(mysql_uri).dialect.loaded_dbapi.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database,
        charset="utf8mb4",
        autocommit=True,
    )
    sql = _FILES_SQL.format(ps="%s")
    lock = threading.Lock()

    def held_rows() -> list:
        with lock:
            cursor = held.cursor()
            cursor.execute(sql, (COLLECTION,))
            rows = cursor.fetchall()
            cursor.close()
        return rows

    db_thread = ThreadPoolExecutor(1, thread_name_prefix="meta-db")

    async def sqlite_inline():
        return await sqlite_reader.searchable_files([COLLECTION], 10.0)

    async def pooled_thread():
        return await pooled_reader.searchable_files([COLLECTION], 10.0)

    async def held_inline():
        return held_rows()

    async def held_db_thread():
        return await asyncio.get_running_loop().run_in_executor(db_thread, held_rows)

    async def held_session():
        return await held_reader.searchable_files([COLLECTION], 10.0)

    return {
        "SQLite, held connection inline (proxy)": sqlite_inline,
        "MySQL before: pool checkout + pre-ping, worker thread": pooled_thread,
        "MySQL: held autocommit PyMySQL, inline (blocks loop)": held_inline,
        "MySQL: held autocommit PyMySQL, 1 dedicated thread": held_db_thread,
        "MySQL now: held session on the loop (mysql_wire)": held_session,
    }


async def measure(lookup: Callable[[], Awaitable], count: int) -> tuple[float, float]:
    """(CPU us, wall us) per lookup; process CPU covers every thread a variant uses."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        await lookup()
    return (time.process_time() - cpu0) / count * 1e6, (time.perf_counter() - wall0) / count * 1e6


async def lookup_table(sqlite_uri: str, mysql_uri: str, rounds: int, count: int) -> list[str]:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(50, thread_name_prefix="mishards-db"))
    variants = lookups(sqlite_uri, mysql_uri)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for lookup in variants.values():  # warm-up: connections, caches, the first parse
        for _ in range(100):
            await lookup()
    for _ in range(rounds):
        for name, lookup in variants.items():
            results[name].append(await measure(lookup, count))
    sqlite_cpu = statistics.median(r[0] for r in results["SQLite, held connection inline (proxy)"])
    lines = [
        f"meta lookup alone: {FILES}-file collection, {rounds} interleaved rounds x {count} lookups, medians",
        f"{'variant':<55} {'CPU us':>8} {'wall us':>8} {'CPU - SQLite':>13}",
    ]
    for name, runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        lines.append(f"{name:<55} {cpu:>8.1f} {wall:>8.1f} {cpu - sqlite_cpu:>+13.1f}")
    return lines


# ---------------------------------------------------------------------------------- part 2
async def searches(address: str, request: bytes, count: int) -> None:
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        search = channel.unary_unary("/milvus.grpc.MilvusService/Search")
        for _ in range(count):
            reply = pb.TopKQueryResult.FromString(await search(request, timeout=60))
            assert reply.status.error_code == 0, reply.status


def proxy_table(
    sqlite_uri: str, mysql_uri: str, base: Path, baseline: str | None, rounds: int, count: int
) -> list[str]:
    request = pb.SearchParam(
        collection_name=COLLECTION,
        query_record_array=records(np.random.default_rng(1).random((1, DIM)).astype(np.float32)),
        topk=10,
        extra_params=[pb.KeyValuePair(key="params", value="{}")],
    ).SerializeToString()
    ports = [free_port(), free_port(), free_port()]
    fake = ManagedProcess(
        "fake nodes",
        [sys.executable, "-m", "tests.support.fake_node", *map(str, ports)],
        cmd_version_probe(f"127.0.0.1:{ports[0]}"),
        base / "fake-nodes.log",
    )
    trees = {"this checkout": ROOT}
    if baseline:
        other = base / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), baseline], check=True)
        trees[baseline] = other
    env = {"LOG_LEVEL": "WARNING", "TIMEOUT": "60"}
    proxies: dict[tuple[str, str], MishardsProcess] = {}
    try:
        with fake:
            for tree, root in trees.items():
                for meta, uri in (("SQLite", sqlite_uri), ("MariaDB", mysql_uri)):
                    proxy = MishardsProcess(
                        woserver=f"127.0.0.1:{ports[2]}",
                        meta_uri=uri,
                        ro_addresses=[f"127.0.0.1:{port}" for port in ports[:2]],
                        log_dir=base,
                        extra_env=env,
                    )
                    proxy.cwd = root
                    proxies[(tree, meta)] = proxy.start()
            for proxy in proxies.values():
                asyncio.run(searches(proxy.address, request, 200))  # warm-up
            results: dict[tuple[str, str], list[float]] = {key: [] for key in proxies}
            for _ in range(rounds):  # interleaved, so drifts in machine load hit all alike
                for key, proxy in proxies.items():
                    cpu0 = cpu_seconds(proxy.pid)
                    asyncio.run(searches(proxy.address, request, count))
                    results[key].append((cpu_seconds(proxy.pid) - cpu0) / count * 1000)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        if baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    lines = [
        f"proxy CPU per search, nq=1 topk=10, 1 in flight, 2 fake nodes, {rounds} interleaved rounds x {count}",
        f"{'proxy':<16} {'meta':<8} {'CPU ms/search':>14} {'range':>13} {'vs SQLite':>10}",
    ]
    for tree in trees:
        sqlite_median = statistics.median(results[(tree, "SQLite")])
        for meta in ("SQLite", "MariaDB"):
            cpu = sorted(results[(tree, meta)])
            median = statistics.median(cpu)
            lines.append(
                f"{tree:<16} {meta:<8} {median:>14.3f} {cpu[0]:>6.3f}-{cpu[-1]:.3f} {median / sqlite_median:>9.3f}x"
            )
    lines.append("MariaDB / SQLite measured back to back in each round (median, range):")
    for tree in trees:
        ratios = sorted(m / s for m, s in zip(results[(tree, "MariaDB")], results[(tree, "SQLite")], strict=True))
        lines.append(f"{tree:<16} {statistics.median(ratios):.3f}x  {ratios[0]:.3f}-{ratios[-1]:.3f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mysql", default=os.environ.get("MISHARDS_TEST_MYSQL_URL"), help="a MariaDB/MySQL URL")
    parser.add_argument("--baseline", help="also measure the proxy of this git revision (e.g. HEAD~3)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=2000, help="per variant and round (part 1)")
    parser.add_argument("--searches", type=int, default=1500, help="per proxy and round (part 2)")
    parser.add_argument("--skip-proxy", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if not args.mysql:
        parser.error("--mysql URL (or MISHARDS_TEST_MYSQL_URL) is required: start one with scripts/mariadb.sh")
    with tempfile.TemporaryDirectory(prefix="mishards-meta-bench-") as tmp:
        base = Path(tmp)
        sqlite_uri = f"sqlite:///{base}/meta.sqlite"
        mysql_uri = fresh_database(args.mysql, "mishards_meta_bench")
        fill_meta(sqlite_uri)
        fill_meta(mysql_uri)
        for line in asyncio.run(lookup_table(sqlite_uri, mysql_uri, args.rounds, args.lookups)):
            print(line, flush=True)
        if not args.skip_proxy:
            print()
            for line in proxy_table(sqlite_uri, mysql_uri, base, args.baseline, args.rounds, args.searches):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

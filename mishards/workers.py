"""SERVER_WORKERS: several proxy processes serving one port, each with its own event loop.

One Python process saturates one core (the merge, the codecs and the HTTP/2 framing are CPU work on
one event loop); with `SERVER_WORKERS=N` (N > 1) the process started becomes a small supervisor
that starts N worker processes (`python -m mishards --worker I ...`, the same program and
configuration). Each worker is a whole proxy: its own gRPC server on SERVER_PORT (SO_REUSEPORT: the
kernel spreads new connections over the workers), its own meta DB session, health checks,
discovery and reload bookkeeping. `SERVER_WORKERS=1` (the default) starts no extra process.

Why per-worker state is correct: every search reads the collection's files and their
`updated_time` from the meta DB, and a worker reloads a file on a read-only node whenever its own
record of that node is older than the file (search.py, `ReloadTracker`). A worker that never saw
a reload done by another one reloads again (one extra `ReloadSegments` per worker and changed
file), so no search can miss a change that another worker had reloaded. Health checks and
discovery run in every worker against the same nodes and configuration, so they agree up to one
check interval.

The supervisor:
* holds the port: a bound, not listening SO_REUSEPORT socket on SERVER_PORT (a taken port is a
  configuration error before any worker starts; SERVER_PORT=0 picks one free port for all);
* serves the side port (METRICS_PORT) itself, once: `/metrics` sums the workers' series (and its
  own process series), the status page and `/status.json` merge the workers' pages and list the
  workers, `/readyz` is ready when every running worker is. Each worker serves its own side port on
  a Unix socket in a private temporary directory, which the supervisor reads per request;
* restarts a worker that dies (after `RESTART_DELAY_S`), unless workers died `MAX_RESTARTS` times
  within `RESTART_WINDOW_S` (then it stops all and exits 1: a crash loop is for the orchestrator to
  see); a worker that fails during start-up stops the whole proxy at once, with the worker's exit
  code (2: configuration error);
* on SIGTERM or SIGINT sends SIGTERM to each worker by PID, waits up to `STOP_TIMEOUT_S`, then
  kills the ones left, by PID.
A worker stops by itself when the supervisor is gone (its end of a socket pair reads EOF), so a
killed supervisor leaves no worker behind.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from mishards.observability.http import ObservabilityServer, bind_socket
from mishards.observability.metrics import merge_exposition, supervisor_families
from mishards.observability.status import render_html
from mishards.settings import Settings

if TYPE_CHECKING:
    from mishards.main import Mishards

log = logging.getLogger("mishards.workers")

START_TIMEOUT_S = 60.0  # a worker not serving this long after it was started is killed
STOP_TIMEOUT_S = 15.0  # on SIGTERM, workers get this long to finish (their own gRPC grace is 3 s)
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5  # worker deaths within RESTART_WINDOW_S that stop the whole proxy
RESTART_WINDOW_S = 60.0
FETCH_TIMEOUT_S = 5.0  # one page from a worker's side port
READY = b"ready\n"


# ---------------------------------------------------------------------------------------------- worker side
@dataclass
class WorkerRole:
    """What a worker process knows of its place: its index, the supervisor's directory, its channel."""

    index: int
    directory: Path
    channel: socket.socket  # a socket pair's end: READY goes up; EOF means the supervisor is gone

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The supervisor's arguments to a worker (not for people: hidden from --help)."""
        parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
        parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
        parser.add_argument("--worker-channel", type=int, help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerRole | None:
        if args.worker is None:
            return None
        if args.worker_dir is None or args.worker_channel is None:
            raise SystemExit("mishards: --worker is started by the supervisor only (SERVER_WORKERS > 1)")
        return cls(args.worker, Path(args.worker_dir), socket.socket(fileno=args.worker_channel))

    @property
    def tag(self) -> str:
        return f"worker {self.index}"

    def bind(self, app: Mishards) -> None:
        """Instead of `Mishards.bind`: SERVER_PORT is the supervisor's (shared by SO_REUSEPORT), and the
        side port is a Unix socket the supervisor reads."""
        if app.settings.metrics_port:
            path = side_socket_path(self.directory, self.index)
            path.unlink(missing_ok=True)  # a dead predecessor's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(64)
            app._metrics_socket = sock

    def attach(self, app: Mishards, stopping: asyncio.Event) -> None:
        """On the worker's loop: stop when the supervisor is gone; tell it when serving."""
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)

        def supervisor_gone() -> None:
            try:
                data = self.channel.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.channel)
                if not stopping.is_set():
                    log.warning("the supervisor is gone: stopping")
                    stopping.set()

        loop.add_reader(self.channel, supervisor_gone)
        app.on_serving = self.serving

    def serving(self) -> None:
        try:
            self.channel.send(READY)
        except OSError:
            pass  # the supervisor is gone; the reader above stops this worker


def side_socket_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


# ---------------------------------------------------------------------------------------------- supervisor side
class StartupFailed(Exception):
    """A worker exited or hung before it served; `code` is the proxy's exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None
    started_at: float = 0.0  # wall clock, for the status page
    ready: bool = False
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Supervisor:
    settings: Settings
    port: int
    directory: Path
    metrics_socket: socket.socket | None = None
    workers: list[Worker] = field(default_factory=list)
    deaths: deque[float] = field(default_factory=deque)
    exit_code: int = 0
    started_at: float = field(default_factory=time.time)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    http: ObservabilityServer | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopping = self.stopping
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        self.workers = [Worker(i) for i in range(self.settings.server_workers)]
        try:
            await asyncio.gather(*(self._start(worker) for worker in self.workers))
        except StartupFailed as exc:
            log.error("%s; stopping", exc)
            await self._stop_all()
            return exc.code
        if self.metrics_socket is not None:
            self.http = AggregateServer(self)
            await self.http.start(self.metrics_socket)
            log.info(
                "metrics, status page and probes of every worker on http://%s:%d/",
                self.settings.metrics_host,
                self.http.port,
            )
        log.info(
            "Mishards serving on %s:%d with %d worker processes (pids %s)",
            self.settings.server_host,
            self.port,
            len(self.workers),
            ", ".join(str(w.pid) for w in self.workers),
        )
        watchers = [asyncio.create_task(self._watch(worker)) for worker in self.workers]
        await stopping.wait()
        log.info("stopping %d workers", len(self.workers))
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await self._stop_all()
        if self.http is not None:
            await self.http.stop()
        return self.exit_code

    def _argv(self, worker: Worker, channel_fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mishards",
            "--worker",
            str(worker.index),
            "--worker-dir",
            str(self.directory),
            "--worker-channel",
            str(channel_fd),
        ]

    async def _start(self, worker: Worker) -> None:
        """Start one worker and wait (bounded) until it serves; StartupFailed when it does not."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ, SERVER_PORT=str(self.port))  # SERVER_PORT=0 resolved once, for all
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self._argv(worker, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.channel, worker.ready, worker.started_at = ours, False, time.time()
        loop = asyncio.get_running_loop()
        try:
            message = await asyncio.wait_for(loop.sock_recv(ours, 64), START_TIMEOUT_S)
        except TimeoutError:
            worker.process.kill()
            await worker.process.wait()
            raise StartupFailed(f"worker {worker.index} did not serve within {START_TIMEOUT_S:g} s", 1) from None
        if message != READY:  # EOF: it exited before serving
            code = await _wait(worker.process, 10.0)
            raise StartupFailed(
                f"worker {worker.index} (pid {worker.pid}) exited with code {code} before serving",
                2 if code == 2 else 1,
            )
        worker.ready = True
        log.info("worker %d (pid %d) serving", worker.index, worker.pid)

    async def _watch(self, worker: Worker) -> None:
        """Wait for the worker to exit; restart it, or stop the proxy when workers keep dying."""
        while True:
            process = worker.process
            assert process is not None  # started before it is watched
            code = await process.wait()
            worker.ready = False
            await asyncio.sleep(0)  # a Ctrl-C reaches the workers and the supervisor at once
            if self.stopping.is_set():
                return
            if worker.channel is not None:
                worker.channel.close()
                worker.channel = None
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > RESTART_WINDOW_S:
                self.deaths.popleft()
            if len(self.deaths) >= MAX_RESTARTS:
                log.error(
                    "worker %d (pid %d) exited with code %s; %d worker deaths within %g s: stopping the proxy",
                    worker.index,
                    worker.pid,
                    code,
                    len(self.deaths),
                    RESTART_WINDOW_S,
                )
                self.exit_code = 1
                self.stopping.set()
                return
            log.error("worker %d (pid %d) exited with code %s; restarting it", worker.index, worker.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            worker.restarts += 1
            try:
                await self._start(worker)
            except StartupFailed as exc:
                log.error("%s; stopping the proxy", exc)
                self.exit_code = exc.code
                self.stopping.set()
                return

    async def _stop_all(self) -> None:
        """SIGTERM to every worker by PID, a bounded wait, then SIGKILL to the ones left."""
        alive = [(w, w.process) for w in self.workers if w.process is not None and w.process.returncode is None]
        for _, process in alive:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker, process in alive:
            code = await _wait(process, max(deadline - time.monotonic(), 0.1))
            if code is None:
                log.error(
                    "worker %d (pid %d) did not stop within %g s: killed", worker.index, worker.pid, STOP_TIMEOUT_S
                )
                _signal(process, signal.SIGKILL)
                await _wait(process, 10.0)
                self.exit_code = self.exit_code or 1
            elif code != 0:
                log.warning("worker %d (pid %d) stopped with code %d", worker.index, worker.pid, code)
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.close()
                worker.channel = None

    # ------------------------------------------------------------------ the workers' side ports
    async def fetch_all(self, path: str) -> list[tuple[Worker, int, bytes]]:
        """`path` from every running worker's side port, concurrently; failures are status 0."""
        running = [w for w in self.workers if w.running() and w.ready]
        replies = await asyncio.gather(*(_fetch(side_socket_path(self.directory, w.index), path) for w in running))
        return [(w, code, body) for w, (code, body) in zip(running, replies, strict=True)]


async def _wait(process: asyncio.subprocess.Process, timeout: float) -> int | None:
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        return None


def _signal(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    if process.returncode is None:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


async def _fetch(path: Path, target: str) -> tuple[int, bytes]:
    """GET `target` over a worker's Unix socket: (status code, body); (0, why) when it fails."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return 0, f"{exc.__class__.__name__}: {exc}".encode()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b"not an HTTP reply"


class AggregateServer(ObservabilityServer):
    """The side port of a proxy with workers: the same pages, over every worker."""

    def __init__(self, supervisor: Supervisor) -> None:
        s = supervisor.settings
        super().__init__(
            None,  # type: ignore[arg-type]  # no metrics or status of its own: `_route` serves every page
            None,  # type: ignore[arg-type]
            idle_timeout=s.metrics_idle_timeout,
            max_connections=s.metrics_max_connections,
        )
        self.supervisor = supervisor
        self.own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.own)  # the supervisor's own CPU and memory join the sums

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        try:
            if path == "/healthz":
                return 200, _TEXT, b"ok\n"
            if path == "/readyz":
                ready, reason = await self.readiness()
                return (200 if ready else 503), _TEXT, f"{reason}\n".encode()
            if path == "/metrics":
                return 200, CONTENT_TYPE, await self.metrics_text()
            if path in ("/", "/status"):
                snapshot = await self.snapshot()
                return 200, "text/html; charset=utf-8", render_html(snapshot).encode()
            if path == "/status.json":
                return 200, "application/json", json.dumps(await self.snapshot(), indent=1).encode()
            return 404, _TEXT, b"not found; try /, /status.json, /metrics, /healthz, /readyz\n"
        except Exception:  # noqa: BLE001 - one bad page must not take the port down
            log.exception("HTTP %s failed", path)
            return 500, _TEXT, b"internal error, see the proxy's log\n"

    async def readiness(self) -> tuple[bool, str]:
        """Ready when some worker runs and every running worker is ready."""
        replies = await self.supervisor.fetch_all("/readyz")
        if not replies:
            return False, "no worker is serving"
        not_ready = {w.index: body.decode(errors="replace").strip() for w, code, body in replies if code != 200}
        return (False, not_ready_reason(not_ready, len(replies))) if not_ready else (True, "ok")

    async def metrics_text(self) -> bytes:
        replies = await self.supervisor.fetch_all("/metrics")
        texts = [body.decode() for _, code, body in replies if code == 200]
        texts.append(generate_latest(self.own).decode())
        workers = self.supervisor.workers
        extra = supervisor_families(
            configured=len(workers),
            serving=sum(1 for w in workers if w.running() and w.ready),
            restarts=sum(w.restarts for w in workers),
        )
        return await self._off_loop(merge_exposition, texts, extra)

    async def snapshot(self) -> dict:
        replies = await self.supervisor.fetch_all("/status.json")
        pages = {w.index: json.loads(body) for w, code, body in replies if code == 200}
        return merge_snapshots(self.supervisor, pages)


_TEXT = "text/plain; charset=utf-8"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NODE_SUMS = ("calls", "failures", "failovers", "hedges", "hedges_won", "ejections", "files_routed")


def merge_snapshots(supervisor: Supervisor, pages: dict[int, dict]) -> dict:
    """One status snapshot of the workers' ones: counts summed, node states and collections as the
    lowest-numbered worker sees them (every worker checks the same nodes), and a row per worker."""
    now = time.time()
    rows = []
    for worker in supervisor.workers:
        page = pages.get(worker.index)
        rows.append(
            {
                "worker": worker.index,
                "pid": worker.pid,
                "state": "serving" if page else ("starting" if worker.running() else "stopped"),
                "ready": bool(page and page["ready"]),
                "restarts": worker.restarts,
                "uptime_s": round(now - worker.started_at, 1),
                "requests": sum(r["requests"] for r in page["requests"]) if page else 0,
            }
        )
    base = {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(supervisor.started_at)),
        "uptime_s": round(now - supervisor.started_at, 1),
        "workers": rows,
    }
    if not pages:
        return {
            **base,
            "ready": False,
            "ready_reason": "no worker is serving",
            "meta_db": "",
            "meta_error": "",
            "settings": supervisor.settings.summary(),
            "requests": [],
            "nodes": [],
            "collections": [],
        }
    first = pages[min(pages)]
    not_ready = {i: p["ready_reason"] for i, p in sorted(pages.items()) if not p["ready"]}
    return {
        **base,
        "ready": not not_ready,
        "ready_reason": not_ready_reason(not_ready, len(pages)) if not_ready else "ok",
        "meta_db": first["meta_db"],
        "meta_error": first["meta_error"],
        "settings": first["settings"],
        "requests": _merge_requests([p["requests"] for p in pages.values()]),
        "nodes": _merge_nodes(first["nodes"], [p["nodes"] for p in pages.values()]),
        "collections": first["collections"],
    }


def not_ready_reason(reasons: dict[int, str], serving: int) -> str:
    """Each distinct reason once, naming its workers unless every serving worker gives it (they
    usually agree: the meta DB and the nodes are the same for all)."""
    by_reason: dict[str, list[int]] = {}
    for index, reason in sorted(reasons.items()):
        by_reason.setdefault(reason, []).append(index)
    if len(by_reason) == 1 and len(reasons) == serving:
        return next(iter(by_reason))
    return "; ".join(
        f"{reason} (worker{'s' if len(indexes) > 1 else ''} {', '.join(map(str, indexes))})"
        for reason, indexes in by_reason.items()
    )


def _merge_requests(per_worker: list[list[dict]]) -> list[dict]:
    """Totals and rates summed; the mean weighted by requests; p50/p99 the highest of the workers'
    (a quantile of the whole is never above the highest of the parts')."""
    merged: dict[str, dict] = {}
    for rows in per_worker:
        for row in rows:
            into = merged.get(row["method"])
            if into is None:
                merged[row["method"]] = dict(row, latency_ms=list(row["latency_ms"]))
                continue
            total = into["requests"] + row["requests"]
            into["mean_ms"] = round((into["mean_ms"] * into["requests"] + row["mean_ms"] * row["requests"]) / total, 3)
            for key in ("requests", "errors"):
                into[key] += row[key]
            for key in ("requests_per_s", "errors_per_s"):
                into[key] = round(into[key] + row[key], 3)
            into["window_s"] = max(into["window_s"], row["window_s"])
            into["latency_ms"] = [_highest(a, b) for a, b in zip(into["latency_ms"], row["latency_ms"], strict=False)]
    return [merged[m] for m in sorted(merged)]


def _highest(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _merge_nodes(first: list[dict], per_worker: list[list[dict]]) -> list[dict]:
    rows = {row["name"]: dict(row) for row in first}
    for rows_of_worker in per_worker:
        if rows_of_worker is first:
            continue
        for row in rows_of_worker:
            into = rows.get(row["name"])
            if into is None:
                continue
            for key in _NODE_SUMS:
                if key in row:
                    into[key] = into.get(key, 0) + row[key]
    return list(rows.values())


# ---------------------------------------------------------------------------------------------- entry
def supervise(settings: Settings, configure_logging: Callable[[str], None]) -> int:
    """Run the supervisor of `settings.server_workers` workers until SIGTERM/SIGINT; the exit code."""
    try:
        reserved, port = reserve_port(settings.server_host, settings.server_port)
    except OSError as exc:
        print(
            f"mishards: configuration error: SERVER_PORT={settings.server_port}: cannot listen on "
            f"{settings.server_host}:{settings.server_port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    metrics_socket = None
    if settings.metrics_port:
        try:
            metrics_socket = bind_socket(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            reserved.close()
            print(
                f"mishards: configuration error: METRICS_PORT={settings.metrics_port}: cannot listen on "
                f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    configure_logging("supervisor")
    directory = Path(tempfile.mkdtemp(prefix="mishards-workers-"))
    try:
        return asyncio.run(Supervisor(settings, port, directory, metrics_socket).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        reserved.close()


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound, not listening SO_REUSEPORT socket on host:port, and the port (resolved when 0).

    It takes no connections (only listening sockets do) and keeps the port from programs that do
    not share it; the workers bind the same port with SO_REUSEPORT."""
    host = host.strip("[]")
    if host in ("", "::"):
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]  # IPv4 alone where IPv6 is off
    else:
        candidates = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    error: OSError | None = None
    for family, address in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            error = exc
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise
            error = exc
            continue
        return sock, int(sock.getsockname()[1])
    assert error is not None
    raise error

"""Backend Milvus nodes as the proxy sees them: the node-call port, handshake, health, membership.

The node-call port (`NodePort`) is the transport boundary: a unary call of serialized bytes with
a deadline (cancel it by cancelling its future), and close. A call that brings no reply fails with
one error family, `NodeCallError` (NodeUnavailable, NodeDeadline, NodeCancelled,
NodeUnimplemented, NodeProtocolError, NodeRejectedRequest), whatever carried it; nothing above
this module sees a transport's own exceptions. It is implemented twice:

- `protocol.client.H2Channel`, the proxy's own HTTP/2 client: every call to a read-only node and the
  search path's calls and health checks of the writable node;
- `node_grpcio.GrpcioChannel`, over grpc.aio: the writable node's forwarded calls (inserts of
  hundreds of MB, index builds: everything but SEARCH_PATH_METHODS), and every call when
  RPC_TRANSPORT=grpcio.

The handshake and the health checks use the same port as the requests, so a node has one
connection to watch: they run on discovery and probe threads and hand their call to the serving
event loop (`Membership.attach`); before that loop runs (start-up), a check opens a short-lived
connection of its own. A node joins the read-only membership only after it answered the version
handshake with a supported version; one that fails it waits and is retried.

Every joined node (and the writable one) is health-checked in the background: a node whose search
fails, that is ejected as an outlier (its calls timed out or lost hedges several times in a row,
see core/hedging.py), or that misses HEALTH_CHECK_FAILURES_TO_REMOVE checks in a row, is marked
unhealthy and left out of routing until it passes HEALTH_CHECK_SUCCESSES_TO_RESTORE checks in a
row. Nothing here ever leaves an empty entry behind.

Addresses keep host names: each new connection resolves them again, and a connection that stops
answering is dropped (protocol.client: a missed PING after a deadline), so a host name that moves to
another IP is followed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from milvus_grpc import milvus_pb2 as pb
from tracer import Metadata
from utils.errors import (
    NodeCallError,
    NodeCancelled,
    NodeDeadline,
    NodeProtocolError,
    NodeRejectedRequest,
    NodeUnavailable,
    NodeUnimplemented,
)
from utils.milvus_schema import method_path

from .node_grpcio import GrpcioChannel
from .protocol.client import H2Channel
from .settings import SUPPORTED_SERVER_VERSIONS

log = logging.getLogger(__name__)

__all__ = [  # the port's error family, re-exported: callers of nodes import them from here
    "NodeCallError",
    "NodeCancelled",
    "NodeDeadline",
    "NodeProtocolError",
    "NodeRejectedRequest",
    "NodeUnavailable",
    "NodeUnimplemented",
]

# The calls of the search path (and the health checks), over the proxy's own HTTP/2 client unless
# RPC_TRANSPORT=grpcio; the writable node's other calls stay on grpcio (see the module docstring).
SEARCH_PATH_METHODS = frozenset({"SearchInFiles", "ReloadSegments", "PreloadCollection", "Cmd"})
HANDSHAKE_TIMEOUT_S = 3.0
LOOP_GRACE_S = 1.0  # a check handed to the serving loop waits this much longer than its own deadline
MAX_PARALLEL_PROBES = 8
_PATHS = {name: method_path(name) for name in pb.DESCRIPTOR.services_by_name["MilvusService"].methods_by_name}
_VERSION_REQUEST = pb.Command(cmd="version").SerializeToString()


class NodePort(Protocol):
    """Unary calls to one node. `call` returns a future of the reply bytes, or fails with
    NodeCallError; cancelling it cancels the call on the node. Use it on one event loop."""

    def call(
        self, path: str, request: bytes, timeout: float | None, metadata: Metadata | None = None
    ) -> asyncio.Future[bytes]: ...

    def close(self) -> None:
        """No new calls; the connection closes once the calls in flight have ended."""


@dataclass(frozen=True)
class HealthPolicy:
    """How often nodes are checked and how many checks in a row flip their state."""

    interval_s: float = 2.0
    timeout_s: float = 1.0
    failures_to_remove: int = 2
    successes_to_restore: int = 2


def version_supported(version: str) -> bool:
    """Milvus versions are accepted by major.minor (0.9.x, 0.10.x), as pymilvus 0.2.14 does."""
    parts = version.strip().split(".")
    return len(parts) >= 2 and ".".join(parts[:2]) in SUPPORTED_SERVER_VERSIONS


class HandshakeError(RuntimeError):
    """A node did not answer `Cmd version`, or answered with an unsupported version."""


@dataclass
class HealthResult:
    """The outcome of one health check, as `Cmd conn_stats` shows it."""

    ok: bool
    at: float
    latency_ms: float
    error: str = ""


@dataclass
class NodeStats:
    """What `Cmd conn_stats` shows of a node. The call counters are written by the search path's
    accounting (`search.Accounting`) and the health fields by `NodeClient`, nowhere else."""

    healthy: bool = True
    version: str = ""
    last_error: str = ""
    last_change: float = field(default_factory=time.time)
    last_health: HealthResult | None = None
    failures_in_a_row: int = 0
    successes_in_a_row: int = 0
    calls: int = 0
    failures: int = 0
    failovers: int = 0  # file groups moved away from this node after it failed them
    files_routed: int = 0
    latency_ms_ewma: float = 0.0
    hedges: int = 0  # hedged calls sent here because another node was slow
    hedges_won: int = 0  # of those, answered first
    ejections: int = 0  # times taken out of routing after slow calls in a row


class NodeClient:
    """One backend node: its node-call port(s), and its health record."""

    def __init__(
        self,
        name: str,
        address: str,
        fast_transport: bool = True,
        port_factory: Callable[[str], NodePort] | None = None,
    ) -> None:
        """`port_factory(address)`, when given, makes the one port that carries every call (tests
        give fake ports; embedders another transport); else as the module docstring says."""
        self.name = name
        self.address = address
        self.fast_transport = fast_transport  # SEARCH_PATH_METHODS over protocol.client.H2Channel
        self._port_factory = port_factory
        self._search_port: NodePort | None = None
        self._bulk_port: NodePort | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = NodeStats()
        self.supports_reload = True  # until the node answers UNIMPLEMENTED
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ calls (on the event loop)
    def call(
        self, method: str, request: bytes, timeout: float | None, metadata: Metadata | None = None
    ) -> asyncio.Future[bytes]:
        """Call `method` on the node: a future of the reply bytes; failures raise NodeCallError.
        Only on the serving event loop. After the node left, calls fail with NodeUnavailable (so a
        search fails over) instead of opening a connection."""
        return self._port(method).call(_PATHS[method], request, timeout, metadata)

    def _port(self, method: str) -> NodePort:
        if self._closed:
            return _Left(f"read-only node {self.name} left")
        if method in SEARCH_PATH_METHODS or not self.fast_transport or self._port_factory is not None:
            port = self._search_port
            if port is None:
                self._loop = asyncio.get_running_loop()
                port = self._search_port = self._new_port()
            return port
        port = self._bulk_port
        if port is None:
            self._loop = asyncio.get_running_loop()
            port = self._bulk_port = GrpcioChannel(self.address)
        return port

    def _new_port(self) -> NodePort:
        if self._port_factory is not None:
            return self._port_factory(self.address)
        return H2Channel(self.address) if self.fast_transport else GrpcioChannel(self.address)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The serving loop: handshakes and health checks from other threads run their call there."""
        if self._loop is None:
            self._loop = loop

    # ------------------------------------------------------------------ handshake and health (any thread)
    def _blocking_call(self, method: str, request: bytes, timeout: float) -> bytes:
        """A call from a discovery or probe thread: over the node's own port on the serving loop;
        before that loop runs, over a short-lived HTTP/2 connection of its own. Bounded by `timeout`."""
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("a blocking node call on the serving event loop would stall it")
            future = asyncio.run_coroutine_threadsafe(self._await(method, request, timeout), loop)
            try:
                return future.result(timeout + LOOP_GRACE_S)
            except concurrent.futures.TimeoutError as exc:
                future.cancel()
                raise NodeDeadline(
                    f"the serving loop did not finish the call within {timeout + LOOP_GRACE_S:.1f} s"
                ) from exc
            except concurrent.futures.CancelledError as exc:
                raise NodeCancelled("the serving loop stopped during the call") from exc
        factory = self._port_factory or H2Channel
        return asyncio.run(_one_off(factory(self.address), _PATHS[method], request, timeout))

    async def _await(self, method: str, request: bytes, timeout: float) -> bytes:
        return await self.call(method, request, timeout)

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> str:
        """Ask `Cmd version` (blocking); the version string if supported, else HandshakeError."""
        if self._closed:
            raise HandshakeError(f"{self.name} ({self.address}) left")
        try:
            raw = self._blocking_call("Cmd", _VERSION_REQUEST, timeout)
        except NodeCallError as exc:
            code = str(exc).split(" ", 1)[0]
            raise HandshakeError(f"{self.name} ({self.address}) did not answer Cmd version: {code}") from exc
        except RuntimeError as exc:  # the serving loop closed meanwhile: the proxy is stopping
            raise HandshakeError(f"{self.name} ({self.address}): the proxy is stopping") from exc
        reply = pb.StringReply.FromString(raw)
        if reply.status.error_code != 0:
            raise HandshakeError(f"{self.name} refused Cmd version: {reply.status.reason}")
        if not version_supported(reply.string_reply):
            raise HandshakeError(
                f"{self.name} ({self.address}) runs Milvus {reply.string_reply!r}; supported: "
                + ", ".join(f"{v}.x" for v in SUPPORTED_SERVER_VERSIONS)
            )
        self.stats.version = reply.string_reply
        return reply.string_reply

    def record(self, ok: bool, seconds: float, error: str = "") -> None:
        """One call's outcome in the node's stats (the accounting point calls this)."""
        with self._lock:
            self.stats.calls += 1
            latency_ms = seconds * 1000
            ewma = self.stats.latency_ms_ewma
            self.stats.latency_ms_ewma = 0.8 * ewma + 0.2 * latency_ms if self.stats.calls > 1 else latency_ms
            if not ok:
                self.stats.failures += 1
                self.stats.last_error = error

    def set_health(self, healthy: bool, error: str = "") -> bool:
        """Change health; True when it changed (so the caller logs each change once)."""
        with self._lock:
            if error:
                self.stats.last_error = error
            if not healthy:
                self.stats.successes_in_a_row = 0
            if self.stats.healthy == healthy:
                return False
            self.stats.healthy = healthy
            self.stats.last_change = time.time()
            return True

    def check(self, policy: HealthPolicy) -> bool | None:
        """One health check (`Cmd version`); the new health state when it flips, else None."""
        if self._closed:  # it left while the check was queued
            return None
        start = time.monotonic()
        try:
            self.handshake(timeout=policy.timeout_s)
            error = ""
        except HandshakeError as exc:
            error = str(exc)
        result = HealthResult(ok=not error, at=time.time(), latency_ms=(time.monotonic() - start) * 1000, error=error)
        with self._lock:
            self.stats.last_health = result
            if result.ok:
                self.stats.successes_in_a_row += 1
                self.stats.failures_in_a_row = 0
                flip = not self.stats.healthy and self.stats.successes_in_a_row >= policy.successes_to_restore
            else:
                self.stats.failures_in_a_row += 1
                self.stats.successes_in_a_row = 0
                flip = self.stats.healthy and self.stats.failures_in_a_row >= policy.failures_to_remove
        if not flip:
            return None
        self.set_health(result.ok, error)
        return result.ok

    @property
    def state(self) -> str:
        return "healthy" if self.stats.healthy else "unhealthy"

    def close(self) -> None:
        """Close the ports, letting in-flight calls finish; safe from any thread."""
        self._closed = True
        ports = [port for port in (self._search_port, self._bulk_port) if port is not None]
        self._search_port = self._bulk_port = None
        loop = self._loop
        if not ports or loop is None or loop.is_closed():
            return
        try:
            for port in ports:  # each closes once its calls have ended
                loop.call_soon_threadsafe(port.close)
        except RuntimeError:  # the loop stopped meanwhile; the process is going away
            pass


class _Left:
    """The port of a node that left: every call fails over at once."""

    def __init__(self, why: str) -> None:
        self.why = why

    def call(
        self, path: str, request: bytes, timeout: float | None, metadata: Metadata | None = None
    ) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.set_exception(NodeUnavailable(self.why))
        return future

    def close(self) -> None:
        pass


async def _one_off(port: NodePort, path: str, request: bytes, timeout: float) -> bytes:
    """One call over a port (a connection) of its own, closed after it (handshakes before the loop runs)."""
    try:
        return await port.call(path, request, timeout)
    finally:
        port.close()
        await asyncio.sleep(0)  # let the transport's close run before the loop ends


class Membership:
    """The read-only nodes, fed by every discovery provider: joined after a handshake, routed to
    while healthy, health-checked all the time. The writable node, when given, is checked too
    (for its state in `Cmd conn_stats`), but never routed to from here.
    """

    def __init__(
        self,
        client_factory: Callable[[str, str], NodeClient] = NodeClient,
        health: HealthPolicy = HealthPolicy(),
        writable: NodeClient | None = None,
    ) -> None:
        self._factory = client_factory
        self.health = health
        self.writable = writable
        self._nodes: dict[str, NodeClient] = {}
        self._waiting: dict[str, str] = {}  # name -> address, failed the handshake, retried
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ changes
    def add(self, name: str, address: str) -> bool:
        """Handshake and join (or move a known name to a new address); on failure remember the
        node and retry it in the background."""
        with self._lock:
            known = self._nodes.get(name)
            if known is not None and known.address == address:
                return True
        client = self._factory(name, address)
        if self._loop is not None:
            client.attach(self._loop)
        try:
            version = client.handshake()
        except HandshakeError as exc:
            client.close()
            with self._lock:
                first = name not in self._waiting
                self._waiting[name] = address
            if first:
                log.warning("read-only node not added (will retry): %s", exc)
            return False
        with self._lock:
            self._waiting.pop(name, None)
            old = self._nodes.pop(name, None)
            self._nodes[name] = client
        if old is not None:
            old.close()
            log.info("read-only node %s moved from %s to %s", name, old.address, address)
        log.info("read-only node %s (%s) joined, Milvus %s", name, address, version)
        self._changed()
        return True

    def remove(self, name: str) -> None:
        """Leave at once (a provider saw it go); a waiting node is forgotten too."""
        with self._lock:
            client = self._nodes.pop(name, None)
            if self._waiting.pop(name, None) is not None and client is None:
                log.info("read-only node %s no longer awaited", name)
        if client is not None:
            client.close()
            log.info("read-only node %s left", name)
            self._changed()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._nodes) + list(self._waiting)

    def mark_failed(self, name: str, error: str) -> None:
        client = self.get(name)
        if client is not None and client.set_health(False, error):
            log.warning("read-only node %s marked unhealthy: %s", name, error)
            self._changed()

    def eject(self, name: str, reason: str) -> bool:
        """Outlier ejection: out of routing at once after slow calls in a row, without waiting for
        health checks; those bring it back (HEALTH_CHECK_SUCCESSES_TO_RESTORE). True when ejected
        (the caller counts it: accounting.Accounting.ejected)."""
        client = self.get(name)
        if client is None or not client.set_health(False, reason):
            return False
        log.warning("read-only node %s ejected from routing: %s", name, reason)
        self._changed()
        return True

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> NodeClient | None:
        with self._lock:
            return self._nodes.get(name)

    def healthy(self) -> dict[str, NodeClient]:
        with self._lock:
            return {n: c for n, c in self._nodes.items() if c.stats.healthy}

    def all(self) -> dict[str, NodeClient]:
        with self._lock:
            return dict(self._nodes)

    def waiting(self) -> dict[str, str]:
        with self._lock:
            return dict(self._waiting)

    # ------------------------------------------------------------------ background
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The serving event loop: from now on handshakes and health checks use each node's own
        connection on it (before, each opens a short-lived one)."""
        self._loop = loop
        for client in [*self.all().values(), *([self.writable] if self.writable is not None else [])]:
            client.attach(loop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._probe_loop, name="membership-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.health.timeout_s + HANDSHAKE_TIMEOUT_S + 2)
        with self._lock:
            clients, self._nodes = list(self._nodes.values()), {}
        for client in clients:
            client.close()

    def _probe_loop(self) -> None:
        with ThreadPoolExecutor(MAX_PARALLEL_PROBES, thread_name_prefix="membership-check") as pool:
            while not self._stop.wait(self.health.interval_s):
                try:
                    self.probe_once(pool)
                except Exception:  # the loop must outlive any surprise
                    log.exception("membership probe failed")

    def probe_once(self, pool: ThreadPoolExecutor | None = None) -> None:
        """Retry nodes that failed the handshake, then health-check every joined node (in parallel,
        so one frozen node delays nothing but its own check)."""
        for name, address in self.waiting().items():
            if self._stop.is_set():
                return
            self.add(name, address)
        checks = list(self.all().items())
        if self.writable is not None:
            checks.append(("writable", self.writable))
        outcomes = (pool.map if pool is not None else map)(lambda item: item[1].check(self.health), checks)
        for (name, client), flipped in zip(checks, outcomes, strict=True):
            if flipped is None:
                continue
            if flipped:
                log.info("node %s (%s) is healthy again", name, client.address)
            else:
                log.warning(
                    "node %s (%s) failed %d health checks in a row: %s",
                    name,
                    client.address,
                    self.health.failures_to_remove,
                    client.stats.last_error,
                )
            if client is not self.writable:
                self._changed()

"""Backend Milvus nodes as the proxy sees them: raw-bytes gRPC clients, handshake, health.

The transport boundary: everything here moves serialized bytes, so forwarding never decodes and
re-encodes a request. Request traffic runs on the server's event loop (no thread per call): the
search path's calls (FAST_METHODS) over the proxy's own HTTP/2 client (`transport.H2Channel`),
everything else over a grpc.aio channel; the handshake and health probes, which run on discovery
and probe threads, use a small blocking grpcio channel of their own. A node joins the read-only
membership only after it answered the version handshake with a supported version; one that
fails it waits and is retried.
Every joined node (and the writable one) is health-checked in the background: a node whose search
fails, that is ejected as an outlier (its calls timed out or lost hedges several times in a row,
see core/hedging.py), or that misses HEALTH_CHECK_FAILURES_TO_REMOVE checks in a row, is marked unhealthy and left
out of routing until it passes HEALTH_CHECK_SUCCESSES_TO_RESTORE checks in a row. Nothing here ever
leaves an empty entry behind.

Addresses keep host names: gRPC's DNS resolver resolves them and re-resolves when a connection
drops (at most once a second here), and a node that turns unhealthy gets a fresh probe channel,
so a host name that moves to another IP is followed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from milvus_grpc import milvus_pb2 as pb
from utils.milvus_schema import method_path

from .core.grpc_h2 import UNAVAILABLE
from .settings import SUPPORTED_SERVER_VERSIONS
from .transport import H2Channel, rpc_error

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # a restarted node is reachable again within ~1 s, not after gRPC's default 120 s backoff cap
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
]
# The search path's calls, made over the proxy's own HTTP/2 client (transport.py) unless
# RPC_TRANSPORT=grpcio; everything else (inserts of hundreds of MB, ...) stays on grpcio.
FAST_METHODS = frozenset({"SearchInFiles", "ReloadSegments"})
HANDSHAKE_TIMEOUT_S = 3.0
MAX_PARALLEL_PROBES = 8
# A node that leaves keeps its channel until its in-flight calls end (each has a deadline, so this
# is only an upper bound): closing at once would cancel them and leave their searches hanging.
DRAIN_GRACE_S = 600.0


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
    healthy: bool = True
    version: str = ""
    last_error: str = ""
    last_change: float = field(default_factory=time.time)
    last_health: HealthResult | None = None
    failures_in_a_row: int = 0
    successes_in_a_row: int = 0
    calls: int = 0
    failures: int = 0
    failovers: int = 0
    files_routed: int = 0
    latency_ms_ewma: float = 0.0
    hedges: int = 0  # hedged calls sent here because another node was slow
    hedges_won: int = 0  # of those, answered first
    ejections: int = 0  # times taken out of routing after slow calls in a row


class NodeClient:
    """One backend node: raw (bytes in, bytes out) callables per RPC, and its health record."""

    def __init__(self, name: str, address: str, fast_transport: bool = True) -> None:
        self.name = name
        self.address = address
        self._probe_channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._h2: H2Channel | None = None
        self.fast_transport = fast_transport  # FAST_METHODS over transport.H2Channel
        self.stats = NodeStats()
        self.supports_reload = True  # until the node answers UNIMPLEMENTED
        self._lock = threading.Lock()
        self._closed = False

    def rpc(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """The asyncio callable for `method`; call only from the server's event loop. After the
        node left, calls fail with UNAVAILABLE (so a search fails over) instead of opening a channel."""
        if self._closed:
            return self._left
        callable_ = self._callables.get(method)
        if callable_ is None and method in FAST_METHODS and self.fast_transport:
            if self._h2 is None:
                self._loop = asyncio.get_running_loop()
                self._h2 = H2Channel(self.address)
            callable_ = self._h2.unary(method_path(method))
            self._callables[method] = callable_
        if callable_ is None:
            if self._channel is None:
                self._loop = asyncio.get_running_loop()
                self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            callable_ = self._channel.unary_unary(method_path(method))
            self._callables[method] = callable_
        return callable_

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> str:
        """Ask `Cmd version` (blocking); the version string if supported, else HandshakeError."""
        try:
            raw = self._probe_channel.unary_unary(method_path("Cmd"))(
                pb.Command(cmd="version").SerializeToString(), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise HandshakeError(f"{self.name} ({self.address}) did not answer Cmd version: {exc.code().name}") from exc
        except ValueError as exc:  # the channel was closed meanwhile: the node left
            raise HandshakeError(f"{self.name} ({self.address}) left") from exc
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
        if not result.ok:
            self.renew_probe_channel()
        return result.ok

    @property
    def state(self) -> str:
        return "healthy" if self.stats.healthy else "unhealthy"

    def renew_probe_channel(self) -> None:
        """A fresh channel resolves the host name again (the request channel re-resolves on its own)."""
        if self._closed:
            return
        old, self._probe_channel = self._probe_channel, grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        old.close()

    async def _left(self, *args, **kwargs) -> bytes:
        raise rpc_error(UNAVAILABLE, f"read-only node {self.name} left")

    def close(self) -> None:
        """Close both channels, letting in-flight calls finish; safe from any thread."""
        self._closed = True
        self._probe_channel.close()
        channel, loop, self._channel = self._channel, self._loop, None
        h2, self._h2 = self._h2, None
        self._callables = {}
        if loop is None or loop.is_closed():
            return
        try:
            if h2 is not None:  # closes once its calls have ended
                loop.call_soon_threadsafe(h2.close)
            if channel is not None:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(channel.close(grace=DRAIN_GRACE_S)))
        except RuntimeError:  # the loop stopped meanwhile; the process is going away
            pass


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

    # ------------------------------------------------------------------ changes
    def add(self, name: str, address: str) -> bool:
        """Handshake and join (or move a known name to a new address); on failure remember the
        node and retry it in the background."""
        with self._lock:
            known = self._nodes.get(name)
            if known is not None and known.address == address:
                return True
        client = self._factory(name, address)
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
        health checks; those bring it back (HEALTH_CHECK_SUCCESSES_TO_RESTORE). True when ejected."""
        client = self.get(name)
        if client is None or not client.set_health(False, reason):
            return False
        client.stats.ejections += 1
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

"""Backend Milvus nodes as the proxy sees them: raw-bytes gRPC clients, handshake, health.

The transport boundary: everything here moves serialized bytes, so forwarding never decodes and
re-encodes a request. Request traffic uses an asyncio channel owned by the server's event loop
(no thread per call); the handshake and health probes, which run on discovery and probe threads,
use a small blocking channel of their own. A node joins the read-only membership only after it
answered the version handshake with a supported version; a node whose calls fail is marked
unhealthy, left out of routing, and probed in the background until it answers again. Nothing
here ever leaves an empty entry behind.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from milvus_grpc import milvus_pb2 as pb

from .settings import SUPPORTED_SERVER_VERSIONS

log = logging.getLogger(__name__)

SERVICE = "milvus.grpc.MilvusService"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
HANDSHAKE_TIMEOUT_S = 3.0
PROBE_INTERVAL_S = 1.0


def version_supported(version: str) -> bool:
    """Milvus versions are accepted by major.minor (0.9.x, 0.10.x), as pymilvus 0.2.14 does."""
    parts = version.strip().split(".")
    return len(parts) >= 2 and ".".join(parts[:2]) in SUPPORTED_SERVER_VERSIONS


class HandshakeError(RuntimeError):
    """A node did not answer `Cmd version`, or answered with an unsupported version."""


@dataclass
class NodeStats:
    healthy: bool = True
    version: str = ""
    last_error: str = ""
    last_change: float = field(default_factory=time.time)
    calls: int = 0
    failures: int = 0
    failovers: int = 0
    files_routed: int = 0
    latency_ms_ewma: float = 0.0


class NodeClient:
    """One backend node: raw (bytes in, bytes out) callables per RPC, and its health record."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._probe_channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.stats = NodeStats()
        self.supports_reload = True  # until the node answers UNIMPLEMENTED
        self._lock = threading.Lock()

    def rpc(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """The asyncio callable for `method`; call only from the server's event loop."""
        callable_ = self._callables.get(method)
        if callable_ is None:
            if self._channel is None:
                self._loop = asyncio.get_running_loop()
                self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            callable_ = self._channel.unary_unary(f"/{SERVICE}/{method}")
            self._callables[method] = callable_
        return callable_

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> str:
        """Ask `Cmd version` (blocking); the version string if supported, else HandshakeError."""
        try:
            raw = self._probe_channel.unary_unary(f"/{SERVICE}/Cmd")(
                pb.Command(cmd="version").SerializeToString(), timeout=timeout)
        except grpc.RpcError as exc:
            raise HandshakeError(f"{self.name} ({self.address}) did not answer Cmd version: {exc.code().name}") from None
        reply = pb.StringReply.FromString(raw)
        if reply.status.error_code != 0:
            raise HandshakeError(f"{self.name} refused Cmd version: {reply.status.reason}")
        if not version_supported(reply.string_reply):
            raise HandshakeError(
                f"{self.name} ({self.address}) runs Milvus {reply.string_reply!r}; supported: "
                + ", ".join(f"{v}.x" for v in SUPPORTED_SERVER_VERSIONS))
        self.stats.version = reply.string_reply
        return reply.string_reply

    def record(self, ok: bool, seconds: float, error: str = "") -> None:
        with self._lock:
            self.stats.calls += 1
            self.stats.latency_ms_ewma = 0.8 * self.stats.latency_ms_ewma + 0.2 * seconds * 1000 if self.stats.calls > 1 else seconds * 1000
            if not ok:
                self.stats.failures += 1
                self.stats.last_error = error

    def set_health(self, healthy: bool, error: str = "") -> bool:
        """Change health; True when it changed (so the caller logs each change once)."""
        with self._lock:
            if error:
                self.stats.last_error = error
            if self.stats.healthy == healthy:
                return False
            self.stats.healthy = healthy
            self.stats.last_change = time.time()
            return True

    def close(self) -> None:
        """Close both channels; safe from any thread."""
        self._probe_channel.close()
        channel, loop, self._channel = self._channel, self._loop, None
        self._callables = {}
        if channel is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(channel.close()))
            except RuntimeError:  # the loop stopped meanwhile; the process is going away
                pass


class Membership:
    """The read-only nodes: joined after a handshake, routed to while healthy, probed when not.

    `version` increments on every change of the healthy set, so routers can cache a ring per
    membership version.
    """

    def __init__(self, client_factory: Callable[[str, str], NodeClient] = NodeClient) -> None:
        self._factory = client_factory
        self._nodes: dict[str, NodeClient] = {}
        self._waiting: dict[str, str] = {}  # name -> address, failed the handshake, retried
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ changes
    def add(self, name: str, address: str) -> bool:
        """Handshake and join; on failure remember the node and retry it in the background."""
        with self._lock:
            if name in self._nodes:
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
        log.info("read-only node %s (%s) joined, Milvus %s", name, address, version)
        self._changed()
        return True

    def remove(self, name: str) -> None:
        with self._lock:
            client = self._nodes.pop(name, None)
            self._waiting.pop(name, None)
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
            self._thread.join(timeout=5)
        with self._lock:
            clients, self._nodes = list(self._nodes.values()), {}
        for client in clients:
            client.close()

    def _probe_loop(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL_S):
            try:
                self.probe_once()
            except Exception:  # the loop must outlive any surprise
                log.exception("membership probe failed")

    def probe_once(self) -> None:
        """Retry nodes that failed the handshake; bring back unhealthy nodes that answer again."""
        for name, address in self.waiting().items():
            if self._stop.is_set():
                return
            self.add(name, address)
        for name, client in self.all().items():
            if client.stats.healthy or self._stop.is_set():
                continue
            try:
                client.handshake(timeout=HANDSHAKE_TIMEOUT_S)
            except HandshakeError as exc:
                client.set_health(False, str(exc))
                continue
            if client.set_health(True):
                log.info("read-only node %s is healthy again", name)
                self._changed()

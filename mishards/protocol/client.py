"""The proxy's own HTTP/2 client for its nodes: `H2Channel`, one implementation of the node-call
port (`nodes.NodePort`).

`H2Channel.call(path, request_bytes, timeout, metadata)` returns a future of the reply bytes;
a call that brings no reply fails with the port's error family (`utils.errors.NodeCallError`:
NodeUnavailable, NodeDeadline, NodeCancelled, NodeProtocolError, ...), never with a grpcio
exception. Its connection opens on first use and again after it drops (after a refused connect,
calls fail fast with NodeUnavailable for a short backoff). Every call has a deadline; when one
passes, the stream is reset and the connection pinged, and a connection that does not answer
within PING_TIMEOUT_S is closed, so a half-open socket cannot swallow calls. Everything runs on the
event loop that uses it. Cancelling the future resets the stream, so the node stops working on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from utils.errors import NodeCallError, NodeDeadline, NodeUnavailable, node_call_error

from .grpc_h2 import CallDone, CallFailed, ClientConnection, PingAcked

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
PING_TIMEOUT_S = 2.0
RECONNECT_BACKOFF_S = (0.2, 1.0)  # first and largest wait after a failed connect


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _ClientProtocol(asyncio.Protocol):
    """Moves bytes between one socket and one ClientConnection; resolves the callers' futures."""

    def __init__(self, channel: H2Channel, connection: ClientConnection) -> None:
        self.channel = channel
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, tuple[asyncio.Future, asyncio.TimerHandle | None]] = {}
        self.ping_timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.flush_due = False  # a flush is scheduled for the next turn of the loop (`flush_soon`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Write at the next turn of the loop: the calls every search of this turn makes to this
        node leave in one send, not a system call each."""
        if not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self.flush_due = False
        self.flush()

    def data_received(self, data: bytes) -> None:
        events = self.connection.receive(data)
        self.flush()
        for event in events:
            if type(event) is CallDone:
                self._resolve(event.stream_id, event.message, None)
            elif type(event) is CallFailed:
                self._resolve(event.stream_id, None, node_call_error(event.code, event.details))
            elif type(event) is PingAcked and self.ping_timer is not None:
                self.ping_timer.cancel()
                self.ping_timer = None
        if self.connection.closed:
            self.close()

    def _resolve(self, stream_id: int, reply: bytes | None, error: Exception | None) -> None:
        entry = self.calls.pop(stream_id, None)
        if entry is None:
            return
        future, timer = entry
        if timer is not None:
            timer.cancel()
        if not future.done():  # a caller that gave up (cancelled) is simply not told
            if error is None:
                future.set_result(reply)
            else:
                future.set_exception(error)
        if self.connection.draining and not self.calls:
            asyncio.get_running_loop().call_soon(self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        reason = f"connection to {self.channel.address} lost" + (f": {exc}" if exc else "")
        for event in self.connection.connection_lost(reason):
            self._resolve(event.stream_id, None, node_call_error(event.code, event.details))
        for stream_id in list(self.calls):  # calls the protocol no longer knew (should be none)
            self._resolve(stream_id, None, NodeUnavailable(reason))
        self.channel._forget(self)

    def close(self) -> None:
        if self.lost:
            return
        self.connection.close()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def start(self, path: bytes, request: bytes, timeout: float | None, metadata, future: _CallFuture) -> None:
        stream_id = self.connection.start_call(path, request, timeout, metadata)
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, self._expired, stream_id)
        self.calls[stream_id] = (future, timer)
        future.on_cancel = (self, stream_id)
        self.flush_soon()

    def caller_gone(self, stream_id: int) -> None:
        """The caller cancelled its future: reset the stream, so the node stops working on it."""
        entry = self.calls.pop(stream_id, None)
        if entry is None:
            return
        if entry[1] is not None:
            entry[1].cancel()
        self.connection.cancel(stream_id)
        self.flush()
        if self.connection.draining and not self.calls:
            self.close()

    def _expired(self, stream_id: int) -> None:
        if stream_id not in self.calls:
            return
        self.connection.cancel(stream_id)
        self._resolve(stream_id, None, NodeDeadline("Deadline Exceeded"))
        if self.ping_timer is None and not self.lost:  # is anybody there?
            self.connection.ping(os.urandom(8))
            self.ping_timer = asyncio.get_running_loop().call_later(PING_TIMEOUT_S, self._ping_missed)
        self.flush()

    def _ping_missed(self) -> None:
        self.ping_timer = None
        log.warning(
            "%s did not answer a PING within %.0f s: closing the connection", self.channel.address, PING_TIMEOUT_S
        )
        if self.transport is not None:
            self.transport.abort()


class _CallFuture(asyncio.Future):
    """A call's reply; cancelling it (the caller gave up, or its task was cancelled) resets the
    stream at once, without a done-callback on every call."""

    on_cancel: tuple[_ClientProtocol, int] | None = None

    def cancel(self, msg=None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled and self.on_cancel is not None:
            protocol, stream_id = self.on_cancel
            self.on_cancel = None
            protocol.caller_gone(stream_id)
        return cancelled


class H2Channel:
    """Unary calls to one node; one connection at a time, opened on demand."""

    def __init__(self, address: str, *, max_receive: int = 2**31 - 1) -> None:
        self.address = address
        self.max_receive = max_receive
        self._protocol: _ClientProtocol | None = None
        self._connecting: asyncio.Future | None = None
        self._retry_at = 0.0
        self._backoff = RECONNECT_BACKOFF_S[0]
        self._last_connect_error = ""
        self._closed = False
        self._paths: dict[str, bytes] = {}

    def unary(self, path: str) -> Callable[..., Awaitable[bytes]]:
        """A callable for one method path: `await call(request, timeout=..., metadata=...)`."""
        encoded = path.encode()

        def call(request: bytes, timeout: float | None = None, metadata=None) -> Awaitable[bytes]:
            return self.start(encoded, request, timeout, metadata)

        return call

    def call(self, path: str, request: bytes, timeout: float | None, metadata=None) -> asyncio.Future[bytes]:
        """The node-call port's unary call (`nodes.NodePort`): a future of the reply bytes."""
        encoded = self._paths.get(path)
        if encoded is None:
            encoded = self._paths[path] = path.encode()
        return self.start(encoded, request, timeout, metadata)

    def start(self, path: bytes, request: bytes, timeout: float | None, metadata=None) -> _CallFuture:
        """Send the request now when connected (no task, no await); a future of the reply bytes."""
        loop = asyncio.get_running_loop()
        future = _CallFuture(loop=loop)
        protocol = self._protocol
        if protocol is not None and protocol.connection.usable:
            protocol.start(path, request, timeout, metadata, future)
            return future
        if self._closed:
            future.set_exception(NodeUnavailable(f"the channel to {self.address} is closed"))
            return future
        deadline = None if timeout is None else loop.time() + timeout
        task = loop.create_task(self._start_connected(path, request, deadline, metadata, future))
        future.add_done_callback(lambda done: task.cancel() if done.cancelled() else None)
        return future

    async def _start_connected(self, path, request, deadline, metadata, future: _CallFuture) -> None:
        loop = asyncio.get_running_loop()
        try:
            protocol = await self._connect(None if deadline is None else max(deadline - loop.time(), 0.001))
        except NodeCallError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if future.done():
            return
        timeout = None if deadline is None else deadline - loop.time()
        if timeout is not None and timeout <= 0:
            future.set_exception(NodeDeadline("Deadline Exceeded while connecting"))
            return
        protocol.start(path, request, timeout, metadata, future)

    async def _connect(self, timeout: float | None) -> _ClientProtocol:
        """The usable connection, opening one if needed; concurrent callers share one attempt."""
        loop = asyncio.get_running_loop()
        while True:
            protocol = self._protocol
            if protocol is not None and protocol.connection.usable:
                return protocol
            if self._closed:
                raise NodeUnavailable(f"the channel to {self.address} is closed")
            if self._connecting is None:
                if time.monotonic() < self._retry_at:
                    raise NodeUnavailable(f"connect to {self.address} failed moments ago: {self._last_connect_error}")
                self._connecting = loop.create_future()
                loop.create_task(self._open(self._connecting))
            try:
                await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
            except TimeoutError as exc:
                raise NodeDeadline(f"Deadline Exceeded connecting to {self.address}") from exc

    async def _open(self, waiter: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_address(self.address)
        connection = ClientConnection(self.address, self.max_receive)
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientProtocol(self, connection), host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError, ValueError) as exc:
            self._last_connect_error = f"{exc.__class__.__name__}: {exc}"
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_S[1])
            self._connecting = None
            waiter.set_exception(NodeUnavailable(f"connect to {self.address} failed: {self._last_connect_error}"))
            waiter.exception()  # marked retrieved: callers that gave up meanwhile leave no warning behind
            return
        self._backoff = RECONNECT_BACKOFF_S[0]
        self._retry_at = 0.0
        self._connecting = None
        self._protocol = protocol
        if self._closed:
            self.close()
        waiter.set_result(protocol)

    def _forget(self, protocol: _ClientProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    def close(self) -> None:
        """No new calls; the connection closes once its calls have ended (each has a deadline)."""
        self._closed = True
        protocol = self._protocol
        if protocol is not None:
            protocol.connection.drain()
            if not protocol.calls:
                protocol.close()

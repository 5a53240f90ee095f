"""The asyncio side of `core.grpc_h2`: the proxy's gRPC server, and unary calls to nodes.

`H2Server` serves raw-bytes handlers (`await handler(request_bytes, context) -> reply_bytes`,
the same handlers the grpc.aio server takes) with one task per request; a request past its
`grpc-timeout` is cancelled and answered DEADLINE_EXCEEDED, one the client resets is cancelled,
an unknown method is answered UNIMPLEMENTED. `stop` sends GOAWAY, lets running requests finish
within the grace period, then closes.

`H2Channel.unary(path)` returns a callable shaped like a grpc.aio multi-callable (`await
call(request_bytes, timeout=..., metadata=...)` -> reply bytes, failures raised as
`grpc.aio.AioRpcError`), so the search path cannot tell it from grpcio. Its connection opens on
first use and again after it drops (after a refused connect, calls fail fast with UNAVAILABLE for
a short backoff). Every call has a deadline; when one passes, the stream is reset and the
connection pinged, and a connection that does not answer within PING_TIMEOUT_S is closed, so a
half-open socket cannot swallow calls. Everything runs on the event loop that uses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from .core.grpc_h2 import (
    CODE_OF,
    DEADLINE_EXCEEDED,
    INTERNAL,
    UNAVAILABLE,
    UNIMPLEMENTED,
    BadMessage,
    CallDone,
    CallFailed,
    ClientConnection,
    PingAcked,
    RequestCancelled,
    RequestReceived,
    ServerConnection,
    inflate,
)
from .core.http2 import DEFAULT_LIMITS, ENHANCE_YOUR_CALM, BufferPool, Limits

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
PING_TIMEOUT_S = 2.0
RECONNECT_BACKOFF_S = (0.2, 1.0)  # first and largest wait after a failed connect (as nodes.CHANNEL_OPTIONS)
TICK_S = 1.0  # how often the server checks its timeouts
WRITE_BUFFER_HIGH = 1024 * 1024  # bytes queued for a peer before we stop reading from it
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_NO_METADATA = grpc.aio.Metadata()


def rpc_error(code: int, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(_CODES.get(code, grpc.StatusCode.UNKNOWN), _NO_METADATA, _NO_METADATA, details=details)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ====================================================================== server
class RequestContext:
    """What the handlers ask of a call: the part of grpc.aio.ServicerContext the service uses."""

    __slots__ = ("_deadline", "_metadata", "_peer")

    def __init__(self, deadline: float | None, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._deadline = deadline
        self._metadata = metadata
        self._peer = peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer


Handler = Callable[[bytes, RequestContext], Awaitable[bytes]]


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.connection = ServerConnection(server.limits, server.pool, self.loop.time())
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.tasks: dict[int, asyncio.Task] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.closing = False
        self.eof_sent = False
        self.writing_paused_at: float | None = None
        self.host = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.server.max_connections:
            open_now = len(self.server.connections)
            log.warning("%d client connections open (H2_MAX_CONNECTIONS): refusing one more", open_now)
            transport.abort()
            return
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple):  # as grpcio writes peers: ipv4:1.2.3.4:5, ipv6:%5B::1%5D:5
            self.host = host = address[0].removeprefix("::ffff:")
            self.peer = f"ipv6:%5B{host}%5D:{address[1]}" if ":" in host else f"ipv4:{host}:{address[1]}"
            if self.server.penalties.refuses(host, self.loop.time()):
                transport.abort()  # it abused its last connection moments ago: no protocol work for it
                return
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server.connections.add(self)
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing() and not self.eof_sent:
            self.transport.write(data)

    def pause_writing(self) -> None:
        """The peer does not read what we send: stop reading what it sends, so that it cannot make
        us queue answers (PING and SETTINGS ACKs, resets) without bound."""
        self.writing_paused_at = self.loop.time()
        self._reading(False)

    def resume_writing(self) -> None:
        self.writing_paused_at = None
        self._reading(True)

    def _reading(self, wanted: bool) -> None:
        """Read from the peer unless its answers back up or its frames wait their turn (backlog)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if wanted and self.writing_paused_at is None and not self.connection.backlog:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._handle(self.connection.receive(data, self.loop.time()))

    def _go_on(self) -> None:
        """Handle the frames a flood left waiting (FRAMES_PER_CALL per turn of the loop)."""
        self._handle(self.connection.receive(b"", self.loop.time()))
        self._reading(True)

    def _handle(self, events: list) -> None:
        for event in events:
            if type(event) is RequestReceived:
                self._dispatch(event)
            elif type(event) is RequestCancelled:
                self._cancel(event.stream_id)
        self.flush()
        if self.connection.closed and self.transport is not None:
            if self.connection.failed_with == ENHANCE_YOUR_CALM and self.host:
                self.server.penalties.offence(self.host, self.loop.time())
            self.transport.close()
            return
        if self.connection.backlog:
            self._reading(False)
            self.loop.call_soon(self._go_on)
        self._finish_if_done()

    def tick(self, now: float) -> None:
        """About once a second: timeouts of the connection and its requests."""
        if self.writing_paused_at is not None and now - self.writing_paused_at > self.server.limits.read_timeout:
            stalled = now - self.writing_paused_at
            log.info("%s has not read our answers for %.0f s: closing its connection", self.peer, stalled)
            if self.transport is not None:
                self.transport.abort()
            return
        events = self.connection.expire(now)
        if events or self.connection.closed:
            self._handle(events)

    def _dispatch(self, event: RequestReceived) -> None:
        handler = self.server.handlers.get(event.path)
        if handler is None:
            path = event.path if len(event.path) <= 200 else event.path[:200] + "..."
            self.connection.send_status(event.stream_id, UNIMPLEMENTED, f"Method not found: {path}")
            self.connection.handler_done(event.stream_id)
            return
        deadline = None
        if event.timeout is not None:
            deadline = time.monotonic() + event.timeout
            self.timers[event.stream_id] = self.loop.call_later(event.timeout, self._expired, event.stream_id)
        context = RequestContext(deadline, event.metadata, self.peer)
        self.tasks[event.stream_id] = self.loop.create_task(self._run(event, handler, context))

    async def _run(self, event: RequestReceived, handler: Handler, context: RequestContext) -> None:
        stream_id, message = event.stream_id, event.message
        try:
            # one turn of the loop first: a reset already on its way (a rapid-reset client sends it
            # in the next write) is read before the handler starts calling nodes
            await asyncio.sleep(0)
            if event.encoding != b"identity":  # inflated off the loop: a bomb must not stall the others
                message = await self.server.inflate(message, event.encoding)
            reply = await handler(message, context)
            if not isinstance(reply, bytes):
                raise TypeError(f"the handler returned {type(reply).__name__}, not bytes")
        except asyncio.CancelledError:
            return  # the client went away or the deadline passed; answered (if at all) by the canceller
        except BadMessage as exc:
            self._finish(stream_id)
            self.connection.send_status(stream_id, CODE_OF[type(exc)], f"bad request body: {exc}")
        except Exception as exc:  # noqa: BLE001 - the service answers every error itself; this is a bug
            log.exception("handler for stream %d failed", stream_id)
            self._finish(stream_id)
            self.connection.send_status(stream_id, INTERNAL, f"internal error: {exc.__class__.__name__}")
        else:
            self._finish(stream_id)
            self.connection.send_reply(stream_id, reply)
        finally:
            self.connection.handler_done(stream_id)
        self.flush()
        self._finish_if_done()

    def _finish(self, stream_id: int) -> None:
        self.tasks.pop(stream_id, None)
        timer = self.timers.pop(stream_id, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, stream_id: int) -> None:
        self.timers.pop(stream_id, None)
        task = self.tasks.pop(stream_id, None)
        if task is not None:
            self._stop(stream_id, task)
            self.connection.send_status(stream_id, DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.flush()

    def _cancel(self, stream_id: int) -> None:
        task = self.tasks.get(stream_id)
        self._finish(stream_id)
        if task is not None:
            self._stop(stream_id, task)

    def _stop(self, stream_id: int, task: asyncio.Task) -> None:
        """Cancel a request's handler; its stream's slot is free once the task has ended (which a
        task cancelled before it ever ran does without running `_run`'s own bookkeeping)."""
        task.cancel()
        task.add_done_callback(lambda _: self.connection.handler_done(stream_id))

    def connection_lost(self, exc: Exception | None) -> None:
        for event in self.connection.connection_lost("connection lost"):
            self._cancel(event.stream_id)
        self.cancel_all()
        self.server.connections.discard(self)

    def cancel_all(self) -> None:
        """Cancel every running handler (the connection is gone, or the server stops)."""
        for stream_id in list(self.tasks):
            self._cancel(stream_id)

    @property
    def idle(self) -> bool:
        """No request running and every reply fully sent (a large one may wait for the client's window)."""
        return not self.tasks and not self.connection.streams

    def shutdown(self) -> None:
        """GOAWAY; once idle, our side of the connection ends (see `_finish_if_done`)."""
        self.closing = True
        self.connection.shutdown()
        self.flush()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """Shutting down and idle: end our half with a FIN after the last byte, and keep reading
        until the client closes. Closing the socket instead would make the kernel answer frames
        still arriving (PING, WINDOW_UPDATE) with a reset that can destroy a reply's unsent tail."""
        if self.closing and self.idle and self.transport is not None and not self.eof_sent:
            self.eof_sent = True
            try:
                self.transport.write_eof()
            except (OSError, NotImplementedError, RuntimeError):  # the client is already gone
                self.transport.close()


def _listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket | None:
    """A dual-stack socket for '::' / '[::]' (as gRPC binds it), IPv4 alone where IPv6 is off."""
    if host.strip("[]") not in ("::", ""):
        return None
    try:
        return _bound(socket.AF_INET6, ("::", port), reuse_port)
    except OSError:  # no IPv6 in this kernel or container
        return _bound(socket.AF_INET, ("0.0.0.0", port), reuse_port)


def _bound(family: socket.AddressFamily, address: tuple, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # worker processes share the port; the kernel spreads connections over them
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class Penalties:
    """Peers whose connection was ended for abuse (GOAWAY ENHANCE_YOUR_CALM): their new connections
    are closed at once for a cooldown that doubles with each offence (1 s, 2 s, ... up to `longest`)
    and is forgotten after a quiet minute, so an abuser cannot reconnect to a fresh set of budgets.
    Established connections from the same address are not touched."""

    def __init__(self, longest: float, size: int = 4096) -> None:
        self.longest = longest
        self.size = size
        self._until: dict[str, tuple[float, float]] = {}  # host -> (refused until, last cooldown)

    def offence(self, host: str, now: float) -> None:
        if self.longest <= 0:
            return
        until, cooldown = self._until.pop(host, (0.0, 0.0))
        cooldown = min(cooldown * 2, self.longest) if now - until < 60 else 1.0
        self._until[host] = (now + min(cooldown, self.longest), cooldown)
        if len(self._until) > self.size:
            del self._until[next(iter(self._until))]
        log.warning("%s broke an abuse limit: its new connections are refused for %.0f s", host, cooldown)

    def refuses(self, host: str, now: float) -> bool:
        entry = self._until.get(host)
        return entry is not None and now < entry[0]


class H2Server:
    """Serves `handlers` ({'/package.Service/Method': handler}) on one port, within `limits`."""

    def __init__(self, handlers: dict[str, Handler], limits: Limits = DEFAULT_LIMITS) -> None:
        self.handlers = handlers
        self.limits = limits
        self.pool = BufferPool(limits.max_buffered)
        self.max_connections = limits.max_connections
        self.penalties = Penalties(limits.abuse_cooldown)
        self.connections: set[_ServerProtocol] = set()
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.Task | None = None
        # one thread: compressed requests are inflated one at a time, so bombs cannot add up
        self._inflater = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mishards-inflate")

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen; the bound port. OSError when the address cannot be bound. `reuse_port`: other
        processes may listen on the same port (SERVER_WORKERS)."""
        loop = asyncio.get_running_loop()
        sock = _listening_socket(host, port, reuse_port)
        if sock is not None:
            self._server = await loop.create_server(lambda: _ServerProtocol(self), sock=sock, backlog=1024)
        else:
            self._server = await loop.create_server(
                lambda: _ServerProtocol(self),
                host.strip("[]"),
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        self._ticker = loop.create_task(self._tick())
        return self._server.sockets[0].getsockname()[1]

    async def inflate(self, message: bytes, encoding: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._inflater, inflate, message, encoding, self.limits.max_message_size)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            for protocol in list(self.connections):
                try:
                    protocol.tick(now)
                except Exception:  # noqa: BLE001 - one connection's bug must not stop the timeouts of all
                    log.exception("timeout check of %s failed", protocol.peer)

    async def stop(self, grace: float) -> None:
        """GOAWAY to every client; requests already received may finish within `grace` seconds."""
        if self._server is not None:
            self._server.close()
        for protocol in list(self.connections):
            protocol.shutdown()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:  # each ends once idle and the client hung up
            await asyncio.sleep(0.02)
        for protocol in list(self.connections):
            protocol.cancel_all()
            protocol.flush()
            if protocol.transport is not None:
                protocol.transport.close()
        if self._ticker is not None:
            self._ticker.cancel()
        self._inflater.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            await self._server.wait_closed()


# ====================================================================== client
class _ClientProtocol(asyncio.Protocol):
    """Moves bytes between one socket and one ClientConnection; resolves the callers' futures."""

    def __init__(self, channel: H2Channel, connection: ClientConnection) -> None:
        self.channel = channel
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, tuple[asyncio.Future, asyncio.TimerHandle | None]] = {}
        self.ping_timer: asyncio.TimerHandle | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        events = self.connection.receive(data)
        self.flush()
        for event in events:
            if type(event) is CallDone:
                self._resolve(event.stream_id, event.message, None)
            elif type(event) is CallFailed:
                self._resolve(event.stream_id, None, rpc_error(event.code, event.details))
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
            self._resolve(event.stream_id, None, rpc_error(event.code, event.details))
        for stream_id in list(self.calls):  # calls the protocol no longer knew (should be none)
            self._resolve(stream_id, None, rpc_error(UNAVAILABLE, reason))
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
        self.flush()

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
        self._resolve(stream_id, None, rpc_error(DEADLINE_EXCEEDED, "Deadline Exceeded"))
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

    def unary(self, path: str) -> Callable[..., Awaitable[bytes]]:
        encoded = path.encode()

        def call(request: bytes, timeout: float | None = None, metadata=None) -> Awaitable[bytes]:
            return self.start(encoded, request, timeout, metadata)

        return call

    def start(self, path: bytes, request: bytes, timeout: float | None, metadata=None) -> asyncio.Future:
        """Send the request now when connected (no task, no await); a future of the reply bytes."""
        loop = asyncio.get_running_loop()
        future = _CallFuture(loop=loop)
        protocol = self._protocol
        if protocol is not None and protocol.connection.usable:
            protocol.start(path, request, timeout, metadata, future)
            return future
        if self._closed:
            future.set_exception(rpc_error(UNAVAILABLE, f"the channel to {self.address} is closed"))
            return future
        deadline = None if timeout is None else loop.time() + timeout
        task = loop.create_task(self._start_connected(path, request, deadline, metadata, future))
        future.add_done_callback(lambda done: task.cancel() if done.cancelled() else None)
        return future

    async def _start_connected(self, path, request, deadline, metadata, future: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        try:
            protocol = await self._connect(None if deadline is None else max(deadline - loop.time(), 0.001))
        except grpc.aio.AioRpcError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if future.done():
            return
        timeout = None if deadline is None else deadline - loop.time()
        if timeout is not None and timeout <= 0:
            future.set_exception(rpc_error(DEADLINE_EXCEEDED, "Deadline Exceeded while connecting"))
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
                raise rpc_error(UNAVAILABLE, f"the channel to {self.address} is closed")
            if self._connecting is None:
                if time.monotonic() < self._retry_at:
                    raise rpc_error(
                        UNAVAILABLE, f"connect to {self.address} failed moments ago: {self._last_connect_error}"
                    )
                self._connecting = loop.create_future()
                loop.create_task(self._open(self._connecting))
            try:
                await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
            except TimeoutError:
                raise rpc_error(DEADLINE_EXCEEDED, f"Deadline Exceeded connecting to {self.address}") from None

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
            waiter.set_exception(
                rpc_error(UNAVAILABLE, f"connect to {self.address} failed: {self._last_connect_error}")
            )
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

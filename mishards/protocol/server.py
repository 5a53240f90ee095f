"""The asyncio side of `grpc_h2`: the proxy's gRPC server (its HTTP/2 client for the nodes
is `client.H2Channel`).

`H2Server` serves raw-bytes handlers (`await handler(request_bytes, context) -> reply_bytes`,
the same handlers the grpc.aio server takes) with one task per request; a request past its
`grpc-timeout` is cancelled and answered DEADLINE_EXCEEDED, one the client resets is cancelled,
an unknown method is answered UNIMPLEMENTED. `stop` sends GOAWAY, lets running requests finish
within the grace period, then closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from .grpc_h2 import (
    CODE_OF,
    DEADLINE_EXCEEDED,
    INTERNAL,
    UNIMPLEMENTED,
    BadMessage,
    RequestCancelled,
    RequestReceived,
    ServerConnection,
    inflate,
)
from .http2 import DEFAULT_LIMITS, ENHANCE_YOUR_CALM, BufferPool, Limits, Pacer

log = logging.getLogger(__name__)

TICK_S = 1.0  # how often the server checks its timeouts
WRITE_BUFFER_HIGH = 1024 * 1024  # bytes queued for a peer before we stop reading from it
PROBATION_START_S = 0.1  # how late a request from an address on probation starts
PROBATION_WAIT_S = 5.0  # the longest such a request waits for its connection to be read on


# ====================================================================== server
class RequestContext:
    """What the handlers ask of a call: the part of grpc.aio.ServicerContext the service uses."""

    __slots__ = ("_deadline", "_metadata", "_peer")

    def __init__(self, deadline: float | None, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> None:
        self._deadline = deadline
        self._metadata = metadata
        self._peer = peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer


Handler = Callable[[bytes, RequestContext], Awaitable[bytes]]


MAX_WORK_PER_CONNECTION = 64
"""Requests of one connection whose handler runs or whose answer the client has not taken yet (its
flow-control windows are used up). Requests beyond it wait, in arrival order, to start: a client
that sends a thousand searches at once, or does not read its answers, cannot have the nodes search
for it without bound; one that reads gets the next slot as each answer leaves."""


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
        self.flush_due = False  # a flush is scheduled for the next turn of the loop (`flush_soon`)
        self.working = 0  # handlers started (past MAX_WORK_PER_CONNECTION) and not ended
        self.waiting_to_start: deque[asyncio.Future] = deque()  # requests held by MAX_WORK_PER_CONNECTION
        self.writing_paused_at: float | None = None
        self.paused_until = 0.0  # reading paused until then: the peer's frames cost it time (`_pace`)
        self.pacer: Pacer | None = None  # shared by the connections of an address on probation
        self.turns = 0  # reads handled (each `receive` call)
        self.turned: asyncio.Future | None = None  # set by the next read or unpause (`_wake`)
        self.host = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream server's
        self.transport = transport
        if len(self.server.connections) >= self.server.max_connections:
            open_now = len(self.server.connections)
            log.warning("%d client connections open (H2_MAX_CONNECTIONS): refusing one more", open_now)
            transport.abort()
            return
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple):  # as grpcio writes peers: ipv4:1.2.3.4:5, ipv6:%5B::1%5D:5
            self.host = host = address[0].removeprefix("::ffff:")
            self.peer = f"ipv6:%5B{host}%5D:{address[1]}" if ":" in host else f"ipv4:{host}:{address[1]}"
            self.pacer = self.server.probation.pacer(host, self.loop.time())
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server.connections.add(self)
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing() and not self.eof_sent:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Write what is ready at the next turn of the loop: the replies of every handler that
        finishes in this turn then leave in one send, not a system call each (at saturation, the
        sends were a third of the proxy's CPU)."""
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self.flush_due = False
        self.flush()
        self._finish_if_done()

    def pause_writing(self) -> None:
        """The peer does not read what we send: stop reading what it sends, so that it cannot make
        us queue answers (PING and SETTINGS ACKs, resets) without bound."""
        self.writing_paused_at = self.loop.time()
        self._reading(False)

    def resume_writing(self) -> None:
        self.writing_paused_at = None
        self._reading(True)

    def _reading(self, wanted: bool) -> None:
        """Read from the peer unless its answers back up, its frames wait their turn (backlog) or
        it is paced."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if wanted and self.writing_paused_at is None and not self.connection.backlog and not self.paused_until:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        events = self.connection.receive(data, self.loop.time())
        self._pace()
        self._handle(events)
        self._read_on()

    def _go_on(self) -> None:
        """Handle the frames a flood left waiting (FRAMES_PER_CALL per turn of the loop)."""
        events = self.connection.receive(b"", self.loop.time())
        self._pace()
        self._handle(events)
        self._read_on()
        self._reading(True)

    def _handle(self, events: list) -> None:
        for event in events:
            if type(event) is RequestReceived:
                self._dispatch(event)
            elif type(event) is RequestCancelled:
                self._cancel(event.stream_id)
        closed = self.connection.closed
        if closed and self.connection.failed_with == ENHANCE_YOUR_CALM and self.host:
            self.server.probation.offence(self.host, self.loop.time())  # before its GOAWAY leaves
        self.flush()
        if closed and self.transport is not None:
            self.transport.close()
            return
        if self.waiting_to_start:
            self._admit()
        if self.connection.backlog and not self.paused_until:
            self._reading(False)
            self.loop.call_soon(self._go_on)
        self._finish_if_done()

    def _pace(self) -> None:
        """Pause reading while the peer is in debt: control frames beyond what its traffic
        accounts for, or any frames beyond its address's share while on probation."""
        now = self.loop.time()
        pause = self.connection.read_pause(now)
        if self.pacer is not None:
            self.pacer.tokens -= self.connection.handled
            pause = max(pause, self.pacer.debt(now))
        if pause > 0 and not self.paused_until:
            self.paused_until = now + pause
            self._reading(False)
            self.loop.call_later(pause, self._unpause)

    def _unpause(self) -> None:
        self.paused_until = 0.0
        if self.connection.closed:
            return
        if self.connection.backlog:
            self._go_on()
        else:
            self._reading(True)
            if self.turned is not None:
                self._wake()

    def _read_on(self) -> None:
        self.turns += 1
        if self.turned is not None:
            self._wake()

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
        turns = self.turns
        counted = False
        try:
            # one turn of the loop first: a reset already on its way (a rapid-reset client sends it
            # in the next write) is read before the handler starts calling nodes
            await asyncio.sleep(0)
            if self.pacer is not None:
                await self._probation_wait(turns)
            if self.waiting_to_start or self.working + self.connection.unsent_answers >= MAX_WORK_PER_CONNECTION:
                await self._until_slot_free()  # counted as working when admitted
            else:
                self.working += 1
            counted = True
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
            if counted:
                self.working -= 1
                if self.waiting_to_start:
                    self._admit()
        self.flush_soon()

    async def _until_slot_free(self) -> None:
        """Wait, in arrival order, for a slot of MAX_WORK_PER_CONNECTION (`_admit` counts it)."""
        ticket = self.loop.create_future()
        self.waiting_to_start.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:  # reset, deadline or connection lost while waiting
            if ticket.done() and not ticket.cancelled():  # admitted, but it will not start: pass the slot on
                self.working -= 1
                self._admit()
            else:
                ticket.cancel()
            raise

    def _admit(self) -> None:
        """Let held requests start, one per free slot (a handler ended, or the client took answers)."""
        free = MAX_WORK_PER_CONNECTION - self.working - self.connection.unsent_answers
        while free > 0 and self.waiting_to_start:
            ticket = self.waiting_to_start.popleft()
            if not ticket.done():
                ticket.set_result(None)
                self.working += 1
                free -= 1

    async def _probation_wait(self, turns: int) -> None:
        """On probation a request starts PROBATION_START_S late, and then only once its connection
        is read on (two more reads since it arrived: frames sent right behind it, such as its reset,
        are handled by then) or reading is not paused (nothing more came); at most PROBATION_WAIT_S.
        Resetting the requests it sends costs an abuser's address nothing."""
        await asyncio.sleep(PROBATION_START_S)
        give_up = self.loop.time() + PROBATION_WAIT_S - PROBATION_START_S
        while self.paused_until and self.turns < turns + 2:
            left = give_up - self.loop.time()
            if left <= 0:
                return
            if self.turned is None:
                self.turned = self.loop.create_future()
            await asyncio.wait((self.turned,), timeout=left)

    def _wake(self) -> None:
        """Requests waiting in `_probation_wait` look again."""
        waiter, self.turned = self.turned, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
            self.flush()
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


class Probation:
    """Addresses whose last connection was ended for abuse (GOAWAY ENHANCE_YOUR_CALM) stay on
    probation for `duration` seconds after their latest offence: their new connections are served,
    but slowly. They share one `Pacer` (every frame a token, `frames` per `window`), so reconnecting
    buys neither fresh budgets nor more of our time, and their requests start late (see
    `_ServerProtocol._probation_wait`), so a reset sent behind a request is read before any node
    works for it. Connections made before the offence are not touched. A well-behaved client
    behind the same address (a NAT) is slowed, never refused."""

    def __init__(self, duration: float, frames: int, window: float, size: int = 4096) -> None:
        self.duration = duration
        self.frames = frames
        self.window = window
        self.size = size
        self._hosts: dict[str, tuple[float, Pacer]] = {}  # host -> (on probation until, its shared pacer)

    def offence(self, host: str, now: float) -> None:
        if self.duration <= 0:
            return
        entry = self._hosts.pop(host, None)
        if entry is None or entry[0] <= now:
            log.warning("%s broke an abuse limit: its new connections are slowed for %.0f s", host, self.duration)
            pacer = Pacer(self.frames, self.window, now)
        else:
            pacer = entry[1]
        self._hosts[host] = (now + self.duration, pacer)
        if len(self._hosts) > self.size:  # the oldest offender is forgotten first
            del self._hosts[next(iter(self._hosts))]

    def pacer(self, host: str, now: float) -> Pacer | None:
        """The pacer a new connection from `host` shares, None when the host is not on probation."""
        entry = self._hosts.get(host)
        return entry[1] if entry is not None and now < entry[0] else None


class H2Server:
    """Serves `handlers` ({'/package.Service/Method': handler}) on one port, within `limits`."""

    def __init__(self, handlers: Mapping[str, Handler], limits: Limits = DEFAULT_LIMITS) -> None:
        self.handlers = handlers
        self.limits = limits
        self.pool = BufferPool(limits.max_buffered)
        self.max_connections = limits.max_connections
        self.probation = Probation(limits.probation, limits.max_control_frames, limits.abuse_window)
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

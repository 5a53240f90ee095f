"""What the conformance cases share: the server under test on its own loop thread, and a raw peer.

The server is the real `mishards.protocol.server.H2Server` on 127.0.0.1:0 with three small handlers
(Echo; Slow, which sleeps until cancelled; Big, which answers N bytes), run by an asyncio loop on
a background thread so the cases can drive a plain blocking socket. The peer speaks HTTP/2
through the `h2` library (its HPACK encoder, its connection preface, its request headers with
validation turned off, so it can say wrong things) and through hand-built frames where h2 refuses
to; what the server answers is parsed with `hyperframe`, header blocks decoded with `hpack`.

Every wait is bounded (WAIT_S); no case sleeps to synchronise: a case that needs to know the
server processed something sends a PING and waits for its ACK (PINGs are answered in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import Settings
from hpack import Decoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mishards import settings
from mishards.protocol.server import H2Server

WAIT_S = 2.0  # the longest any single wait for an answer may take
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types and flags (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
UNKNOWN_TYPE = 0xFA
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED = 0, 1, 2, 3, 4, 5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = 6, 7, 8, 9, 10, 11
ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
}
# settings ids
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6
MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME = 16_384
RECEIVE_WINDOW = 1 << 30  # the peer's windows unless a case sets them

SERVICE = "conformance.Test"
ECHO = f"/{SERVICE}/Echo"
SLOW = f"/{SERVICE}/Slow"  # sleeps float(request) seconds (30 when empty) unless cancelled
BIG = f"/{SERVICE}/Big"  # answers int(request) bytes of b"x"

# gRPC status codes
GRPC_OK, GRPC_DEADLINE_EXCEEDED, GRPC_RESOURCE_EXHAUSTED = 0, 4, 8
GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 12, 13


# ====================================================================== the server
class Handlers:
    """The handlers; counters are read from the test thread (ints: atomic enough under the GIL)."""

    def __init__(self) -> None:
        self.slow_started = 0
        self.slow_cancelled = 0
        self.echoed = 0
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def echo(self, request: bytes, context) -> bytes:
        self.echoed += 1
        return request

    async def slow(self, request: bytes, context) -> bytes:
        self.slow_started += 1
        self.started.set()
        try:
            await asyncio.sleep(float(request or b"30"))
        except asyncio.CancelledError:
            self.slow_cancelled += 1
            self.cancelled.set()
            raise
        return b"slept"

    async def big(self, request: bytes, context) -> bytes:
        return b"x" * int(request)

    def table(self) -> dict:
        return {ECHO: self.echo, SLOW: self.slow, BIG: self.big}


def build_server(handlers: dict, limits: dict[str, str]) -> H2Server:
    """An H2Server with the contract's limits given by their environment names (docs/front-door.md),
    read by the proxy's own settings code, so a misnamed variable fails here as it would in production."""
    return H2Server(handlers, settings._front_door(settings.Source(limits)))


class ServerThread:
    """An H2Server on 127.0.0.1:0, served by an asyncio loop on a daemon thread."""

    def __init__(self, limits: dict[str, str] | None = None) -> None:
        self.limits = dict(limits or {})
        self.handlers = Handlers()
        self.loop = asyncio.new_event_loop()
        self.server: H2Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="h2-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.server = build_server(self.handlers.table(), self.limits)
        self.port = self.call(self.server.start("127.0.0.1", 0))
        return self

    def call(self, coroutine, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def connection_count(self) -> int:
        return self.call(self._count())

    async def _count(self) -> int:
        return len(self.server.connections)

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.call(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


@contextlib.contextmanager
def serving(limits: dict[str, str] | None = None) -> Iterator[ServerThread]:
    server = ServerThread(limits).start()
    try:
        yield server
    finally:
        server.stop()


# ====================================================================== frames
def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """Any frame, right or wrong; `length` overrides the header's length field."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def settings_frame(pairs: list[tuple[int, int]] | dict[int, int] = (), flags: int = 0) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return raw_frame(SETTINGS, flags, 0, b"".join(struct.pack(">HI", key, value) for key, value in items))


def window_update(stream_id: int, increment: int) -> bytes:
    return raw_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return raw_frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def priority(stream_id: int, depends_on: int = 0, weight: int = 15, exclusive: bool = False) -> bytes:
    dependency = depends_on | (0x80000000 if exclusive else 0)
    return raw_frame(PRIORITY, 0, stream_id, struct.pack(">IB", dependency, weight))


def ping(opaque: bytes = b"12345678", flags: int = 0) -> bytes:
    return raw_frame(PING, flags, 0, opaque)


def goaway(last_stream_id: int = 0, code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return raw_frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def grpc_message(message: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(message).to_bytes(4, "big") + message


def data(stream_id: int, payload: bytes, end_stream: bool = True, pad: int | None = None) -> bytes:
    flags = END_STREAM if end_stream else 0
    if pad is not None:
        return raw_frame(DATA, flags | PADDED, stream_id, bytes((pad,)) + payload + b"\0" * pad)
    return raw_frame(DATA, flags, stream_id, payload)


def request_headers(path: str = ECHO, extra: list[tuple[str, str]] = (), **overrides) -> list[tuple[str, str]]:
    """A gRPC request's headers in order; `overrides` replace (None: drop) the standard ones."""
    standard = {
        ":method": "POST",
        ":scheme": "http",
        ":path": path,
        ":authority": "127.0.0.1",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    for name, value in overrides.items():
        key = name.replace("_", "-")
        key = f":{key[7:]}" if key.startswith("pseudo-") else key
        if value is None:
            standard.pop(key, None)
        else:
            standard[key] = value
    return list(standard.items()) + list(extra)


@dataclass
class Received:
    """One frame from the server, and the decoded header list for a completed header block."""

    frame: Frame
    headers: list[tuple[str, str]] | None = None
    claimed: bool = False

    @property
    def kind(self) -> str:
        return type(self.frame).__name__

    def __repr__(self) -> str:
        frame = self.frame
        text = f"{self.kind}(stream={frame.stream_id}, flags={sorted(frame.flags)}"
        if isinstance(frame, GoAwayFrame):
            text += f", code={ERROR_NAMES.get(frame.error_code, frame.error_code)}, debug={frame.additional_data!r}"
        elif isinstance(frame, RstStreamFrame):
            text += f", code={ERROR_NAMES.get(frame.error_code, frame.error_code)}"
        elif isinstance(frame, DataFrame):
            text += f", {len(frame.data)} bytes"
        elif isinstance(frame, WindowUpdateFrame):
            text += f", +{frame.window_increment}"
        elif isinstance(frame, SettingsFrame):
            text += f", {dict(frame.settings)}"
        if self.headers is not None:
            text += f", headers={self.headers}"
        return text + ")"


@dataclass
class Response:
    """Everything the server sent on one stream up to END_STREAM."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data_frames: list[int] = field(default_factory=list)  # sizes of the DATA frames

    def header(self, name: str) -> str | None:
        for key, value in self.trailers + self.headers:
            if key == name:
                return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        from urllib.parse import unquote

        return unquote(self.header("grpc-message") or "")

    @property
    def message(self) -> bytes:
        """The one gRPC message of the body."""
        assert len(self.body) >= 5, f"no gRPC message in {self.body[:20]!r}"
        assert int.from_bytes(self.body[1:5], "big") == len(self.body) - 5
        return self.body[5:]


class ConnectionEnded(AssertionError):
    pass


class Peer:
    """A raw HTTP/2 client on a blocking socket: `h2` composes, hand-built frames break rules."""

    def __init__(self, port: int, handshake: bool = True, settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = H2Connection(config)
        self.decoder = Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self._buffer = bytearray()
        self._block: tuple[Frame, bytearray] | None = None
        self.received: list[Received] = []
        self.eof = False
        self.server_settings: dict[int, int] = {}
        self._pings = 0
        if handshake:
            self.handshake(settings)

    # ------------------------------------------------------------------ sending
    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def try_send(self, *chunks: bytes) -> bool:
        """Send, tolerating a server that already closed (after its GOAWAY)."""
        try:
            self.send(*chunks)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def handshake(self, settings: dict[int, int] | None = None) -> None:
        """h2's client preface (+ our SETTINGS), the server's SETTINGS acknowledged, ours ACKed."""
        # large receive windows unless a case asks otherwise: replies never wait for our credit
        wanted = {INITIAL_WINDOW_SIZE: RECEIVE_WINDOW, ENABLE_PUSH: 0, **(settings or {})}
        self.h2.local_settings = Settings(client=True, initial_values=wanted)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(RECEIVE_WINDOW)
        self.send(self.h2.data_to_send())
        first = self.read_until(lambda r: True)
        assert isinstance(first.frame, SettingsFrame) and "ACK" not in first.frame.flags, (
            f"the server's first frame must be its SETTINGS, got {first}"
        )
        self.server_settings = dict(first.frame.settings)
        self.send(settings_frame(flags=ACK))
        self.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags)

    def encode(self, headers: list[tuple[str, str]]) -> bytes:
        """A header block from h2's own HPACK encoder (one dynamic table per connection)."""
        return self.h2.encoder.encode([(n.encode(), v.encode()) for n, v in headers])

    def headers_frame(
        self,
        stream_id: int,
        headers: list[tuple[str, str]] | None = None,
        end_stream: bool = False,
        end_headers: bool = True,
        block: bytes | None = None,
        pad: int | None = None,
        depends_on: int | None = None,
    ) -> bytes:
        if block is None:
            block = self.encode(headers if headers is not None else request_headers())
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        payload = block
        if depends_on is not None:
            flags |= PRIORITY_FLAG
            payload = struct.pack(">IB", depends_on, 15) + payload
        if pad is not None:
            flags |= PADDED
            payload = bytes((pad,)) + payload + b"\0" * pad
        return raw_frame(HEADERS, flags, stream_id, payload)

    def request(
        self, stream_id: int, path: str = ECHO, body: bytes = b"hello", headers=None, end_stream: bool = True
    ) -> bytes:
        """HEADERS then one DATA frame carrying `body` as one gRPC message."""
        block = self.headers_frame(stream_id, headers if headers is not None else request_headers(path))
        return block + data(stream_id, grpc_message(body), end_stream=end_stream)

    def h2_request(self, stream_id: int, headers: list[tuple[str, str]], body: bytes | None = b"hello") -> bytes:
        """The same composed by h2 itself (validation off): what a sloppy or hostile client sends."""
        self.h2.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.h2.send_data(stream_id, grpc_message(body), end_stream=True)
        return self.h2.data_to_send()

    # ------------------------------------------------------------------ receiving
    def _read_more(self, deadline: float) -> bool:
        """Some more bytes (False at EOF); ConnectionEnded-free, TimeoutError past the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except (ConnectionResetError, ConnectionAbortedError):
            chunk = b""
        except TimeoutError:
            raise TimeoutError from None
        if not chunk:
            self.eof = True
            return False
        self._buffer += chunk
        return True

    def _next_frame(self) -> Received | None:
        if len(self._buffer) < 9:
            return None
        frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
        if len(self._buffer) < 9 + length:
            return None
        frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
        del self._buffer[: 9 + length]
        received = Received(frame)
        if isinstance(frame, HeadersFrame):
            self._block = (frame, bytearray(frame.data))
        elif isinstance(frame, ContinuationFrame) and self._block is not None:
            self._block[1].extend(frame.data)
        if isinstance(frame, HeadersFrame | ContinuationFrame) and "END_HEADERS" in frame.flags and self._block:
            first, block = self._block  # a completed block is reported on its HEADERS frame
            self._block = None
            received = Received(first, self.decoder.decode(bytes(block)))
        self.received.append(received)
        return received

    def frames(self, timeout: float = WAIT_S) -> Iterator[Received]:
        """Frames as they arrive until EOF; TimeoutError when nothing arrives in time."""
        deadline = time.monotonic() + timeout
        while True:
            received = self._next_frame()
            if received is not None:
                yield received
                continue
            if self.eof or not self._read_more(deadline):
                return

    def read_until(self, predicate: Callable[[Received], bool], timeout: float = WAIT_S) -> Received:
        """The first frame, already received and not yet claimed or arriving within `timeout`,
        that `predicate` accepts; it is claimed (a later wait does not see it again)."""
        for received in self.received:
            if not received.claimed and predicate(received):
                received.claimed = True
                return received
        seen: list[Received] = []
        try:
            for received in self.frames(timeout):
                seen.append(received)
                if predicate(received):
                    received.claimed = True
                    return received
        except TimeoutError:
            raise AssertionError(f"nothing expected within {timeout} s; received {seen[-12:]}") from None
        raise ConnectionEnded(f"the connection ended first; received {seen[-12:]}")

    def expect_goaway(self, code: int, debug: bytes | None = None, timeout: float = WAIT_S) -> GoAwayFrame:
        """A GOAWAY with `code` (and debug data), then the server closes the connection."""
        received = self.read_until(lambda r: isinstance(r.frame, GoAwayFrame), timeout)
        frame = received.frame
        assert frame.error_code == code, (
            f"GOAWAY {ERROR_NAMES.get(frame.error_code, frame.error_code)}, expected {ERROR_NAMES[code]}; "
            f"frames: {self.received[-12:]}"
        )
        if debug is not None:
            assert frame.additional_data == debug, f"GOAWAY debug data {frame.additional_data!r}, expected {debug!r}"
        self.expect_closed(timeout)
        return frame

    def expect_closed(self, timeout: float = WAIT_S) -> None:
        try:
            for _ in self.frames(timeout):
                pass
        except TimeoutError:
            raise AssertionError(f"the server did not close the connection within {timeout} s") from None

    def expect_rst(self, stream_id: int, code: int, timeout: float = WAIT_S) -> RstStreamFrame:
        """RST_STREAM(code) on the stream while the connection goes on (checked with a PING)."""

        def answer(r: Received) -> bool:
            if isinstance(r.frame, GoAwayFrame):
                raise AssertionError(f"connection error instead of RST_STREAM on {stream_id}: {r}")
            return isinstance(r.frame, RstStreamFrame) and r.frame.stream_id == stream_id

        frame = self.read_until(answer, timeout).frame
        assert frame.error_code == code, (
            f"RST_STREAM {ERROR_NAMES.get(frame.error_code, frame.error_code)} on {stream_id}, "
            f"expected {ERROR_NAMES[code]}"
        )
        self.expect_alive()
        return frame

    def expect_alive(self, timeout: float = WAIT_S) -> None:
        """The connection still works: a PING is answered (and no GOAWAY came before its ACK)."""
        self._pings += 1
        opaque = b"alive%03d" % (self._pings % 1000)

        def acked(r: Received) -> bool:
            if isinstance(r.frame, GoAwayFrame):
                raise AssertionError(f"the connection was ended: {r}")
            return isinstance(r.frame, PingFrame) and "ACK" in r.frame.flags and r.frame.opaque_data == opaque

        assert self.try_send(ping(opaque)), "the server closed the connection"
        self.read_until(acked, timeout)

    def response(self, stream_id: int, timeout: float = WAIT_S) -> Response:
        """Headers, body and trailers of one stream, up to END_STREAM; RST/GOAWAY fail the case."""
        response = Response()

        def done(r: Received) -> bool:
            frame = r.frame
            if isinstance(frame, GoAwayFrame) or (isinstance(frame, RstStreamFrame) and frame.stream_id == stream_id):
                raise AssertionError(f"no response on stream {stream_id}: {r}")
            if frame.stream_id != stream_id:
                return False
            if isinstance(frame, HeadersFrame) and r.headers is not None:
                if response.headers:
                    response.trailers = r.headers
                else:
                    response.headers = r.headers
            elif isinstance(frame, DataFrame):
                response.body += frame.data
                response.data_frames.append(len(frame.data))
            return "END_STREAM" in frame.flags and (r.headers is not None or isinstance(frame, DataFrame))

        self.read_until(done, timeout)
        return response

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def header_list_size(headers: list[tuple[str, str]]) -> int:
    """RFC 7541 section 4.1: name + value + 32 per field."""
    return sum(len(name.encode()) + len(value.encode()) + 32 for name, value in headers)


def unique(prefix: str = "") -> str:
    return prefix + os.urandom(4).hex()

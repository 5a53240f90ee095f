"""Unary gRPC over `core.http2`: the proxy's server connection and its client connection to nodes.

gRPC's HTTP/2 mapping, as used here: a request is HEADERS (POST, `:path` /package.Service/Method,
`content-type: application/grpc`, `te: trailers`, optional `grpc-timeout` and metadata) then DATA
carrying one length-prefixed message (1 byte compressed flag, 4 bytes big-endian length); a reply
is HEADERS (`:status 200`), DATA with one message, then trailers with `grpc-status` and
`grpc-message` (percent-encoded); a failure may come as trailers alone ("trailers-only").
Status codes are gRPC's numbers (0 OK, 4 DEADLINE_EXCEEDED, 12 UNIMPLEMENTED, 14 UNAVAILABLE, ...).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections import deque
from typing import NamedTuple
from urllib.parse import quote, unquote

from .http2 import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    MAX_STREAM_ID,
    MAX_WINDOW,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    UINT32,
    Connection,
    ProtocolError,
    _Stream,
    frame,
    literal,
    literal_indexed_name,
)

OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 7, 8, 12, 13, 14, 16

# What a non-200 HTTP status means for gRPC (gRPC's http-grpc-status-mapping).
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED}
_HTTP_TO_GRPC.update(dict.fromkeys((429, 502, 503, 504), UNAVAILABLE))
_RST_TO_GRPC = {REFUSED_STREAM: UNAVAILABLE, CANCEL: CANCELLED, ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# request headers that are protocol, not the caller's metadata
_RESERVED = frozenset((b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"))
_GRPC_CONTENT_TYPE = b"application/grpc"
# what compressed messages may use (zlib wbits: 16+ gzip framing, 15 zlib framing as "deflate")
_DECOMPRESSORS = {b"gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), b"deflate": lambda: zlib.decompressobj()}


class _NotHttp2(Exception):
    """The first bytes are not the HTTP/2 client preface."""


class BadMessage(ValueError):
    """A unary body that is not one well-formed message (INTERNAL)."""


class MessageTooLarge(BadMessage):
    """Over the receive limit, possibly only once decompressed (RESOURCE_EXHAUSTED)."""


class UnsupportedEncoding(BadMessage):
    """Compressed with an encoding this side does not read (UNIMPLEMENTED)."""


def encode_timeout(seconds: float) -> bytes:
    """The `grpc-timeout` value: at most 8 digits, in the finest unit that fits."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1), (b"M", 1 / 60), (b"H", 1 / 3600)):
        value = max(int(seconds * scale), 1)
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def decode_timeout(value: bytes) -> float:
    scale = _TIMEOUT_UNITS.get(value[-1:])
    if scale is None or not 1 <= len(value) <= 9 or not value[:-1].isdigit():
        raise ValueError(f"bad grpc-timeout {value!r}")
    return int(value[:-1]) * scale


def message_prefix(message: bytes) -> bytes:
    return len(message).to_bytes(5, "big")  # compressed flag 0, then the length


def frame_message(message: bytes) -> bytes:
    return message_prefix(message) + message


def unframe_message(body: bytes | bytearray, encoding: bytes = b"identity", limit: int = MAX_WINDOW) -> bytes:
    """The one message of a unary body, decompressed per `grpc-encoding`; BadMessage says what is wrong."""
    if len(body) < 5:
        raise BadMessage("no message")
    if int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise BadMessage("not exactly one message")
    if not body[0]:
        return bytes(memoryview(body)[5:])  # one copy (slicing the bytearray would make two)
    if encoding == b"identity":
        raise BadMessage("compressed message without a grpc-encoding")
    if encoding not in _DECOMPRESSORS:
        raise UnsupportedEncoding(f"compressed message with grpc-encoding {encoding.decode('latin-1')!r}")
    inflater = _DECOMPRESSORS[encoding]()
    try:
        message = inflater.decompress(bytes(body[5:]), limit + 1)
    except zlib.error as exc:
        raise BadMessage(f"bad {encoding.decode('latin-1')} data: {exc}") from None
    if len(message) > limit or inflater.unconsumed_tail:
        raise MessageTooLarge(f"message over the {limit} byte limit once decompressed")
    if not inflater.eof:
        raise BadMessage("truncated compressed message")
    return message


_CODE_OF = {MessageTooLarge: RESOURCE_EXHAUSTED, UnsupportedEncoding: UNIMPLEMENTED, BadMessage: INTERNAL}


def metadata_headers(metadata) -> bytes:
    block = b""
    for key, value in metadata or ():
        name = key.lower().encode()
        raw = value if isinstance(value, bytes) else value.encode()
        if name.endswith(b"-bin"):
            raw = base64.b64encode(raw).rstrip(b"=")
        block += literal(name, raw)
    return block


# ====================================================================== client
class CallDone(NamedTuple):
    stream_id: int
    message: bytes


class CallFailed(NamedTuple):
    stream_id: int
    code: int
    details: str


class PingAcked(NamedTuple):
    opaque: bytes


class _Call(_Stream):
    __slots__ = ("status", "message", "http_status", "block", "encoding")

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.encoding = b"identity"
        self.status: int | None = None
        self.message = ""
        self.http_status = 0
        self.block: bytes | None = None  # header block, while queued behind MAX_CONCURRENT_STREAMS


class ClientConnection(Connection):
    """One connection carrying unary calls; `usable` says whether new calls may start."""

    def __init__(self, authority: str, max_receive: int = 512 * 1024 * 1024) -> None:
        super().__init__()
        self.authority = authority.encode()
        self.max_receive = max_receive
        self._next_id = 1
        self.draining = False  # GOAWAY received or ids exhausted: finish what runs, start nothing
        self.queued: deque[int] = deque()  # calls waiting for the peer's MAX_CONCURRENT_STREAMS
        self._prefix: dict[bytes, bytes] = {}
        self._out += [PREFACE, self._local_settings()]

    @property
    def usable(self) -> bool:
        return not (self.closed or self.draining)

    def start_call(self, path: bytes, message: bytes, timeout: float | None, metadata=None) -> int:
        """Open a stream carrying one request; its id, to match the CallDone/CallFailed event."""
        if not self.usable:
            raise ProtocolError("the connection takes no new calls")
        stream_id = self._next_id
        self._next_id += 2
        if self._next_id > MAX_STREAM_ID:
            self.draining = True
        block = self._prefix.get(path)
        if block is None:  # :method POST, :scheme http, :path, :authority, content-type, te
            block = (
                b"\x83\x86"
                + literal_indexed_name(4, path)
                + literal_indexed_name(1, self.authority)
                + literal_indexed_name(31, _GRPC_CONTENT_TYPE)
                + literal(b"te", b"trailers")
            )
            self._prefix[path] = block
        if timeout is not None:
            block += literal(b"grpc-timeout", encode_timeout(timeout))
        if metadata:
            block += metadata_headers(metadata)
        call = _Call(self._peer_window)
        call.head, call.pending = message_prefix(message), memoryview(message)
        self.streams[stream_id] = call
        if len(self.streams) - len(self.queued) > self.peer_max_streams:
            call.block = block
            self.queued.append(stream_id)
        else:
            self._open(stream_id, call, block)
        return stream_id

    def _open(self, stream_id: int, call: _Call, block: bytes) -> None:
        self._send_headers(stream_id, block)
        self._send_body(stream_id, call, call.head, call.pending, None)

    def _start_queued(self) -> None:
        while self.queued and len(self.streams) - len(self.queued) < self.peer_max_streams:
            stream_id = self.queued.popleft()
            call = self.streams[stream_id]
            block, call.block = call.block, None
            self._open(stream_id, call, block)

    def cancel(self, stream_id: int) -> None:
        """Forget a call (deadline passed) and tell the peer if it had heard of it."""
        call = self.streams.get(stream_id)
        if call is None:
            return
        if call.block is not None:  # still queued here
            del self.streams[stream_id]
            self.queued.remove(stream_id)
        else:
            self.reset(stream_id, CANCEL)
            self._start_queued()

    def close(self) -> None:
        """Say goodbye; the adapter closes the socket."""
        if not self.closed:
            self.goaway(0)
            self.closed = True

    def connection_lost(self, reason: str) -> list:
        """Every open call fails as UNAVAILABLE: safe to retry elsewhere."""
        self.closed = True
        failed = [CallFailed(stream_id, UNAVAILABLE, reason) for stream_id in self.streams]
        self.streams.clear()
        self.queued.clear()
        return failed

    def _settings_applied(self) -> None:
        super()._settings_applied()
        self._start_queued()

    def _headers(self, stream_id, headers, end_stream, events) -> None:
        call = self.streams.get(stream_id)
        if call is None:
            return
        for name, value in headers:
            if name == b":status":
                call.http_status = int(value)
            elif name == b"grpc-status":
                call.status = int(value)
            elif name == b"grpc-message":
                call.message = unquote(value.decode("utf-8", "replace"))
            elif name == b"grpc-encoding":
                call.encoding = value
        if end_stream:
            self._finish(stream_id, events)

    def _data(self, stream_id, stream, data, end_stream, events) -> None:
        stream.body += data
        if len(stream.body) > self.max_receive + 5:
            self.cancel(stream_id)
            events.append(CallFailed(stream_id, RESOURCE_EXHAUSTED, f"reply over the {self.max_receive} byte limit"))
        elif end_stream:
            self._finish(stream_id, events)

    def _reset_by_peer(self, stream_id, error_code, events) -> None:
        code = _RST_TO_GRPC.get(error_code, INTERNAL)
        events.append(CallFailed(stream_id, code, f"stream reset by the server (HTTP/2 error {error_code})"))
        self._start_queued()

    def _goaway_received(self, last_stream_id, error_code, events) -> None:
        self.draining = True
        for lost in [s for s in self.streams if s > last_stream_id]:  # never processed: safe to retry
            call = self.streams.pop(lost)
            if call.block is not None:
                self.queued.remove(lost)
            events.append(
                CallFailed(lost, UNAVAILABLE, f"the server is going away (GOAWAY, HTTP/2 error {error_code})")
            )

    def _ping_acked(self, opaque, events) -> None:
        events.append(PingAcked(opaque))

    def _finish(self, stream_id: int, events: list) -> None:
        call = self.streams.pop(stream_id)
        if call.head or call.pending:  # the server answered before reading all of the request: stop sending it
            self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(NO_ERROR)))
        self._start_queued()
        if call.http_status != 200:
            code = _HTTP_TO_GRPC.get(call.http_status, UNKNOWN)
            events.append(CallFailed(stream_id, code, f"HTTP status {call.http_status} from the server"))
        elif call.status is None:
            events.append(CallFailed(stream_id, INTERNAL, "the server ended the call without a grpc-status"))
        elif call.status != OK:
            events.append(CallFailed(stream_id, call.status, call.message))
        else:
            try:
                events.append(CallDone(stream_id, unframe_message(call.body, call.encoding, self.max_receive)))
            except BadMessage as exc:
                events.append(CallFailed(stream_id, _CODE_OF[type(exc)], f"bad reply: {exc}"))


# ====================================================================== server
class RequestReceived(NamedTuple):
    stream_id: int
    path: str
    message: bytes
    timeout: float | None
    metadata: tuple[tuple[str, str], ...]


class RequestRejected(NamedTuple):
    """A request that cannot be served; the trailers-only answer is already queued."""

    stream_id: int
    code: int
    details: str


class RequestCancelled(NamedTuple):
    stream_id: int


class _Request(_Stream):
    __slots__ = ("path", "timeout", "metadata", "answered", "encoding")

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.encoding = b"identity"
        self.path = ""
        self.timeout: float | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.answered = False


_REPLY_HEADERS = b"\x88" + literal_indexed_name(31, _GRPC_CONTENT_TYPE)  # :status 200, content-type
_TRAILERS_OK = literal(b"grpc-status", b"0")


class ServerConnection(Connection):
    """The server side of one client connection: requests in, replies and statuses out."""

    STREAM_WINDOW = 4 * 1024 * 1024  # granted again as it is consumed (large inserts stream through)
    CONNECTION_WINDOW = 64 * 1024 * 1024
    MAX_STREAMS = 1024
    MAX_FRAME = 1024 * 1024  # fewer, larger DATA frames for large inserts

    def __init__(self, max_receive: int = MAX_WINDOW) -> None:
        super().__init__()
        self.max_receive = max_receive
        self._preface_seen = False
        self.last_stream_id = 0
        self.going_away = False
        self._out.append(self._local_settings())

    def _preface(self, buffer: bytearray) -> int:
        if self._preface_seen:
            return 0
        if buffer[: len(PREFACE)] != PREFACE:
            raise _NotHttp2()
        self._preface_seen = True
        return len(PREFACE)

    def receive(self, data: bytes) -> list:
        if not self._preface_seen and len(self._in) + len(data) < len(PREFACE):
            self._in += data
            return [] if PREFACE.startswith(bytes(self._in)) else self._not_http2()
        try:
            return super().receive(data)
        except _NotHttp2:
            return self._not_http2()

    def _not_http2(self) -> list:
        """Not an HTTP/2 client (an HTTP/1 request, a port scanner): GOAWAY and close."""
        self._in.clear()
        self.goaway(0, PROTOCOL_ERROR)
        self.closed = True
        return []

    # ------------------------------------------------------------------ answers
    def send_reply(self, stream_id: int, message: bytes) -> None:
        request = self.streams.get(stream_id)
        if request is None or request.answered:
            return  # cancelled by the client meanwhile
        request.answered = True
        self._send_headers(stream_id, _REPLY_HEADERS)
        self._send_body(stream_id, request, message_prefix(message), message, _TRAILERS_OK)

    def send_status(self, stream_id: int, code: int, details: str) -> None:
        """A trailers-only answer (no message): how errors outside Milvus' own Status travel."""
        request = self.streams.get(stream_id)
        if request is None or request.answered:
            return
        request.answered = True
        self._trailers_only(stream_id, code, details)
        self.streams.pop(stream_id, None)

    def _trailers_only(self, stream_id: int, code: int, details: str) -> None:
        block = _REPLY_HEADERS + literal(b"grpc-status", str(code).encode())
        if details:
            block += literal(b"grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        self._send_headers(stream_id, block, end_stream=True)

    def _sent(self, stream_id: int) -> None:
        request = self.streams.get(stream_id)
        if request is not None and request.answered:
            del self.streams[stream_id]

    def shutdown(self) -> None:
        """GOAWAY: requests already received are still answered, later ones are refused."""
        if not self.going_away and not self.closed:
            self.going_away = True
            self.goaway(self.last_stream_id)

    # ------------------------------------------------------------------ requests
    def _headers(self, stream_id, headers, end_stream, events) -> None:
        request = self.streams.get(stream_id)
        if request is not None:  # trailers from the client: a unary request has none to speak of
            if end_stream:
                self._complete(stream_id, request, events)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            raise ProtocolError(f"bad stream id {stream_id}")
        self.last_stream_id = stream_id
        if self.going_away or len(self.streams) >= (self.MAX_STREAMS or 2**31):
            self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(REFUSED_STREAM)))
            return
        request = _Request(self._peer_window)
        self.streams[stream_id] = request
        method = content_type = b""
        encoding = b"identity"
        metadata = []
        try:
            for name, value in headers:
                if name[:1] == b":":
                    if name == b":path":
                        request.path = value.decode("ascii")
                    elif name == b":method":
                        method = value
                elif name == b"content-type":
                    content_type = value
                elif name == b"grpc-timeout":
                    request.timeout = decode_timeout(value)
                elif name == b"grpc-encoding":
                    encoding = value
                elif name not in _RESERVED:
                    text = name.decode("ascii")
                    if text.endswith("-bin"):
                        metadata.append((text, base64.b64decode(value + b"=" * (-len(value) % 4))))
                    else:
                        metadata.append((text, value.decode("utf-8", "replace")))
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            return self._reject(stream_id, INTERNAL, f"bad request headers: {exc}", events)
        request.metadata = tuple(metadata)
        if method != b"POST":
            return self._reject(stream_id, UNIMPLEMENTED, "only POST is served", events)
        if not content_type.startswith(_GRPC_CONTENT_TYPE):
            return self._reject(
                stream_id, INTERNAL, f"content-type {content_type.decode('latin-1')!r} is not gRPC", events
            )
        if encoding != b"identity" and encoding not in _DECOMPRESSORS:
            details = f"grpc-encoding {encoding.decode('latin-1')} is not supported"
            return self._reject(stream_id, UNIMPLEMENTED, details, events)
        request.encoding = encoding
        if end_stream:
            self._complete(stream_id, request, events)

    def _reject(self, stream_id: int, code: int, details: str, events: list) -> None:
        self.streams[stream_id].answered = True
        self._trailers_only(stream_id, code, details)
        events.append(RequestRejected(stream_id, code, details))
        # kept in `streams` until the client ends its half, so its DATA is simply dropped

    def _data(self, stream_id, stream, data, end_stream, events) -> None:
        if not stream.answered:
            stream.body += data
            if len(stream.body) > self.max_receive + 5:
                stream.body = bytearray()
                self._reject(stream_id, RESOURCE_EXHAUSTED, f"request over the {self.max_receive} byte limit", events)
        if end_stream:
            self._complete(stream_id, stream, events)

    def _complete(self, stream_id: int, request: _Request, events: list) -> None:
        if request.answered:  # rejected earlier: forget it now that the client is done sending
            if not (request.head or request.pending):
                self.streams.pop(stream_id, None)
            return
        try:
            message = unframe_message(request.body, request.encoding, self.max_receive)
        except BadMessage as exc:
            code = _CODE_OF[type(exc)]
            request.answered = True
            self._trailers_only(stream_id, code, f"bad request body: {exc}")
            self.streams.pop(stream_id, None)
            events.append(RequestRejected(stream_id, code, str(exc)))
            return
        request.body = bytearray()
        events.append(RequestReceived(stream_id, request.path, message, request.timeout, request.metadata))

    def _reset_by_peer(self, stream_id, error_code, events) -> None:
        events.append(RequestCancelled(stream_id))

    def _goaway_received(self, last_stream_id, error_code, events) -> None:
        pass  # the client stops sending; replies to what it sent still go out

    def connection_lost(self, reason: str) -> list:
        self.closed = True
        cancelled = [RequestCancelled(stream_id) for stream_id in self.streams]
        self.streams.clear()
        return cancelled

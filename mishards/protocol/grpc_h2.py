"""Unary gRPC over `http2`: the proxy's server connection and its client connection to nodes.

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
    DEFAULT_LIMITS,
    ENHANCE_YOUR_CALM,
    MAX_STREAM_ID,
    MAX_WINDOW,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    RECV_HEADERS,
    REFUSED_STREAM,
    RST_STREAM,
    UINT32,
    BufferPool,
    Connection,
    Limits,
    ProtocolError,
    Stream,
    StreamError,
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
    compressed, payload = split_message(body, encoding)
    return inflate(payload, encoding, limit) if compressed else payload


def split_message(body: bytes | bytearray, encoding: bytes = b"identity") -> tuple[bool, bytes]:
    """(compressed?, payload) of a unary body: the framing checked, nothing inflated yet (that
    may be slow, so the server's adapter does it off its event loop)."""
    if len(body) < 5:
        raise BadMessage("no message")
    if int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise BadMessage("not exactly one message")
    payload = bytes(memoryview(body)[5:])  # one copy (slicing the bytearray would make two)
    if not body[0]:
        return False, payload
    if encoding == b"identity":
        raise BadMessage("compressed message without a grpc-encoding")
    if encoding not in _DECOMPRESSORS:
        raise UnsupportedEncoding(f"compressed message with grpc-encoding {encoding.decode('latin-1')!r}")
    return True, payload


_INFLATE_STEP = 1 << 20
_INFLATE_KEPT = 16 << 20  # decompressed bytes kept on the first pass


def inflate(payload: bytes, encoding: bytes, limit: int) -> bytes:
    """Decompress at most `limit` bytes, a step at a time. The output is kept only while it stays
    small (`_INFLATE_KEPT`); a message that grows past that is first measured without keeping it,
    and inflated again, kept, only once it is known to fit. A bomb is refused having held a few
    MiB, not the limit; a legitimate large compressed message costs a second inflate."""
    chunks, size = _inflated(payload, encoding, limit, keep=_INFLATE_KEPT)
    if chunks is None:  # fits, but too large to have been kept on the first pass
        chunks, size = _inflated(payload, encoding, limit, keep=limit)
    return b"".join(chunks)  # type: ignore[arg-type]


def _inflated(payload: bytes, encoding: bytes, limit: int, keep: int) -> tuple[list[bytes] | None, int]:
    """The decompressed chunks (None once they passed `keep` bytes: counted, not kept) and size."""
    inflater = _DECOMPRESSORS[encoding]()
    chunks: list[bytes] | None = []
    size = 0
    pending = payload
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, _INFLATE_STEP)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break  # the input is used up before the end of the stream
            size += len(chunk)
            if size > limit:
                raise MessageTooLarge(f"message over the {limit} byte limit once decompressed (H2_MAX_MESSAGE_SIZE)")
            if chunks is not None:
                chunks.append(chunk)
                if size > keep:
                    chunks = None
    except zlib.error as exc:
        raise BadMessage(f"bad {encoding.decode('latin-1')} data: {exc}") from exc
    if not inflater.eof:
        raise BadMessage("truncated compressed message")
    return chunks, size


CODE_OF = {MessageTooLarge: RESOURCE_EXHAUSTED, UnsupportedEncoding: UNIMPLEMENTED, BadMessage: INTERNAL}


def metadata_headers(metadata) -> bytes:
    block = b""
    for key, value in metadata or ():
        name = key.lower().encode()
        raw = value if isinstance(value, bytes) else value.encode()
        if name.endswith(b"-bin"):
            raw = base64.b64encode(raw).rstrip(b"=")
        block += literal(name, raw)
    return block


def _shown(value: bytes | str, limit: int = 100) -> str:
    """A peer's value quoted in an error, cut short: answers never echo unbounded input."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


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


class _Call(Stream):
    __slots__ = ("status", "message", "http_status", "block", "encoding")

    def __init__(self, window: int, recv_window: int) -> None:
        super().__init__(window, recv_window)
        self.encoding = b"identity"
        self.status: int | None = None
        self.message = ""
        self.http_status = 0
        self.block: bytes | None = None  # header block, while queued behind MAX_CONCURRENT_STREAMS


class ClientConnection(Connection[_Call]):
    """One connection carrying unary calls to a node; `usable` says whether new calls may start."""

    OPENING = PREFACE

    def __init__(self, authority: str, max_receive: int = 512 * 1024 * 1024, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self.authority = authority.encode()
        self.max_receive = max_receive
        self._next_id = 1
        self.draining = False  # GOAWAY received or ids exhausted: finish what runs, start nothing
        self.queued: deque[int] = deque()  # calls waiting for the peer's MAX_CONCURRENT_STREAMS
        self._prefix: dict[bytes, bytes] = {}

    @property
    def usable(self) -> bool:
        return not (self.closed or self.draining)

    def drain(self) -> None:
        """Start no new calls; the ones running finish."""
        self.draining = True

    def _is_idle_local(self, stream_id: int) -> bool:
        return stream_id >= self._next_id

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
        call = _Call(self._peer_window, self.STREAM_WINDOW)
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
            if block is not None:
                self._open(stream_id, call, block)

    def cancel(self, stream_id: int) -> None:
        """Forget a call (deadline passed, caller gone) and tell the peer if it had heard of it."""
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
        self._forget_streams()
        self.queued.clear()
        return failed

    def _settings_applied(self) -> None:
        super()._settings_applied()
        self._start_queued()

    def _headers(self, stream_id, stream, headers, end_stream, events) -> None:
        for name, value in headers:
            if name == b":status":
                stream.http_status = int(value)
            elif name == b"grpc-status":
                stream.status = int(value)
            elif name == b"grpc-message":
                stream.message = unquote(value.decode("utf-8", "replace"))
            elif name == b"grpc-encoding":
                stream.encoding = value

    def _data(self, stream_id, stream, data, end_stream, events) -> bool:
        stream.body += data
        if len(stream.body) > self.max_receive + 5:
            self.cancel(stream_id)
            events.append(CallFailed(stream_id, RESOURCE_EXHAUSTED, f"reply over the {self.max_receive} byte limit"))
            return False
        return True

    def _reset_by_peer(self, stream_id, error_code, events) -> None:
        code = _RST_TO_GRPC.get(error_code, INTERNAL)
        events.append(CallFailed(stream_id, code, f"stream reset by the server (HTTP/2 error {error_code})"))
        self._start_queued()

    def _reset_here(self, stream_id, code, reason, events) -> None:
        events.append(CallFailed(stream_id, INTERNAL, f"the server broke HTTP/2 on this call: {reason}"))
        self._start_queued()

    def _goaway_received(self, last_stream_id, error_code, events) -> None:
        self.draining = True
        for lost in [s for s in self.streams if s > last_stream_id]:  # never processed: safe to retry
            call = self.streams[lost]
            if call.block is not None:
                self.queued.remove(lost)
                del self.streams[lost]
            else:
                self._close(lost, call, reset_here=False)
            events.append(
                CallFailed(lost, UNAVAILABLE, f"the server is going away (GOAWAY, HTTP/2 error {error_code})")
            )

    def _ping_acked(self, opaque, events) -> None:
        events.append(PingAcked(opaque))

    def _complete(self, stream_id: int, call: _Call, events: list) -> None:
        if stream_id in self.streams:  # the server answered before reading all of the request: stop sending it
            self._close(stream_id, call, reset_here=True)
            self.send_frame(RST_STREAM, 0, stream_id, UINT32.pack(NO_ERROR))
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
                events.append(CallFailed(stream_id, CODE_OF[type(exc)], f"bad reply: {exc}"))


# ====================================================================== server
class RequestReceived(NamedTuple):
    """A complete request. `encoding` other than identity: `message` is still compressed, to be
    inflated (`inflate`) off the event loop."""

    stream_id: int
    path: str
    message: bytes
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...]  # -bin values decoded to bytes
    encoding: bytes = b"identity"


class RequestCancelled(NamedTuple):
    stream_id: int


class _Request(Stream):
    __slots__ = ("path", "timeout", "metadata", "answered", "encoding")

    def __init__(self, window: int, recv_window: int) -> None:
        super().__init__(window, recv_window)
        self.encoding = b"identity"
        self.path = ""
        self.timeout: float | None = None
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.answered = False


_REPLY_HEADERS = b"\x88" + literal_indexed_name(31, _GRPC_CONTENT_TYPE)  # :status 200, content-type
_TRAILERS_OK = literal(b"grpc-status", b"0")
# headers HTTP/2 forbids (RFC 9113 section 8.2.2)
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def _is_grpc(content_type: bytes) -> bool:
    """application/grpc, optionally followed by +format or ;parameters (gRPC's HTTP/2 mapping)."""
    rest = content_type[len(_GRPC_CONTENT_TYPE) :]
    return content_type.startswith(_GRPC_CONTENT_TYPE) and (not rest or rest[:1] in (b"+", b";"))


class ServerConnection(Connection[_Request]):
    """The server side of one client connection: requests in, replies and statuses out."""

    STREAM_WINDOW = 4 * 1024 * 1024  # credited again as it is taken (large inserts stream through)
    CONNECTION_WINDOW = 16 * 1024 * 1024
    MAX_FRAME = 64 * 1024  # larger DATA frames for large inserts; what a half-sent frame may hold
    FRAMES_PER_CALL = 256
    BOUNDED = True
    PEER_STARTS_ODD = True

    def __init__(
        self, limits: Limits = DEFAULT_LIMITS, pool: BufferPool | None = None, now: float | None = None
    ) -> None:
        super().__init__(limits, pool, now)
        self.created = self.last_received
        self._preface_seen = False
        self._settings_seen = False
        self.going_away = False
        self._handling: set[int] = set()  # requests whose handler runs
        self._detached: set[int] = set()  # ... of which the stream is gone (reset, timed out)
        self._unsent: set[int] = set()  # answered streams whose answer waits for the client's window

    @property
    def last_stream_id(self) -> int:
        return self._highest_peer_stream

    @property
    def unsent_answers(self) -> int:
        """Answers the client has not let us send yet (its flow-control windows are used up)."""
        return len(self._unsent)

    @property
    def active_streams(self) -> int:
        """What counts against MAX_CONCURRENT_STREAMS: open streams, and handlers of streams the
        client reset that have not ended yet (a reset does not make room until the work stopped)."""
        return len(self.streams) + len(self._detached)

    def _preface(self, buffer) -> int:
        if self._preface_seen:
            return 0
        if buffer[: len(PREFACE)] != PREFACE:
            raise _NotHttp2()
        self._preface_seen = True
        return len(PREFACE)

    def receive(self, data: bytes, now: float | None = None) -> list:
        if not self._preface_seen and len(self._in) + len(data) < len(PREFACE):
            self._in += data
            return [] if PREFACE.startswith(bytes(self._in)) else self._not_http2()
        try:
            return super().receive(data, now)
        except _NotHttp2:
            return self._not_http2()

    def _not_http2(self) -> list:
        """Not an HTTP/2 client (an HTTP/1 request, a port scanner): GOAWAY and close."""
        self._in.clear()
        self.goaway(0, PROTOCOL_ERROR, b"not an HTTP/2 client preface")
        self.closed = True
        return []

    def expire(self, now: float) -> list:
        """Besides the read timeouts: no handshake within `handshake_timeout`, or no stream and
        nothing received for `idle_timeout`, ends the connection."""
        if self.closed:
            return []
        limits = self.limits
        if not self._settings_seen and now - self.created > limits.handshake_timeout:
            return self.fail(PROTOCOL_ERROR, f"no HTTP/2 handshake within {limits.handshake_timeout:g} s")
        if not self.active_streams and now - self.last_received > limits.idle_timeout:
            self.goaway(self._highest_peer_stream, NO_ERROR, b"idle")
            return self.connection_lost(f"idle for {limits.idle_timeout:g} s")
        return super().expire(now)

    def _settings(self, payload: bytes) -> None:
        self._settings_seen = True
        super()._settings(payload)

    # ------------------------------------------------------------------ answers
    def send_reply(self, stream_id: int, message: bytes) -> None:
        request = self.streams.get(stream_id)
        if request is None or request.answered:
            return  # cancelled by the client meanwhile
        request.answered = True
        self._handling.discard(stream_id)  # an answer means the handler is done
        self._send_headers(stream_id, _REPLY_HEADERS)
        self._send_body(stream_id, request, message_prefix(message), message, _TRAILERS_OK)
        if stream_id in self.streams and (request.head or request.pending):  # the client's window is used up
            self._unsent.add(stream_id)

    def send_status(self, stream_id: int, code: int, details: str) -> None:
        """A trailers-only answer (no message): how errors outside Milvus' own Status travel."""
        request = self.streams.get(stream_id)
        if request is None or request.answered:
            return
        request.answered = True
        self._handling.discard(stream_id)
        self._trailers_only(stream_id, code, details)

    def _trailers_only(self, stream_id: int, code: int, details: str) -> None:
        block = _REPLY_HEADERS + literal(b"grpc-status", str(code).encode())
        if details:
            block += literal(b"grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        self._send_headers(stream_id, block, end_stream=True)

    def handler_done(self, stream_id: int) -> None:
        """The adapter's handler for this request ended (answered, failed or cancelled)."""
        self._handling.discard(stream_id)
        self._detached.discard(stream_id)

    def _closed_stream(self, stream_id: int) -> None:
        self._unsent.discard(stream_id)
        if stream_id in self._handling:
            self._detached.add(stream_id)

    def shutdown(self) -> None:
        """GOAWAY: requests already received are still answered, later ones are refused."""
        if not self.going_away and not self.closed:
            self.going_away = True
            self.goaway(self._highest_peer_stream)

    # ------------------------------------------------------------------ requests
    def _open_by_peer(self, stream_id, headers, end_stream, now, events) -> _Request | None:
        if self.going_away or self.active_streams >= self.limits.max_concurrent_streams:
            self._spend(self._resets, "too_many_resets", now)
            self.refuse(stream_id, REFUSED_STREAM)
            return None
        request = _Request(self._peer_window, self.STREAM_WINDOW)
        request.move(stream_id, RECV_HEADERS)
        self._opened_stream(stream_id, request, now)
        size = 32 * len(headers)  # RFC 7541's size: name + value + 32 per field
        for name, value in headers:
            size += len(name) + len(value)
        if size > self.limits.max_header_list_size:
            # refused like a stream over the limit: a client that keeps sending them is ended
            # (too_many_resets) instead of costing a header decode per request without end
            self._spend(self._resets, "too_many_resets", now)
            limit = self.limits.max_header_list_size
            details = f"request headers of {size} bytes exceed the limit of {limit} bytes (H2_MAX_HEADER_LIST_SIZE)"
            self._reject(stream_id, request, RESOURCE_EXHAUSTED, details)
            return request
        method = content_type = scheme = path = b""
        encoding = b"identity"
        metadata: list[tuple[str, str | bytes]] = []
        regular = authority = False
        try:
            for name, value in headers:
                if name[:1] == b":":
                    if regular:
                        raise StreamError(stream_id, PROTOCOL_ERROR, "a pseudo-header after a regular header")
                    if name == b":path" and not path:
                        path = value
                    elif name == b":method" and not method:
                        method = value
                    elif name == b":scheme" and not scheme:
                        scheme = value
                    elif name == b":authority" and not authority:
                        authority = True
                    else:  # unknown, a response's, or one seen before
                        raise StreamError(stream_id, PROTOCOL_ERROR, f"pseudo-header {_shown(name, 40)} not allowed")
                    continue
                regular = True
                if not name.islower() and name != name.lower():
                    raise StreamError(stream_id, PROTOCOL_ERROR, "upper-case header name")
                if name in _CONNECTION_SPECIFIC:
                    raise StreamError(stream_id, PROTOCOL_ERROR, f"connection-specific header {_shown(name, 40)}")
                if name == b"content-type":
                    content_type = value
                elif name == b"grpc-timeout":
                    request.timeout = decode_timeout(value)
                elif name == b"grpc-encoding":
                    encoding = value
                elif name == b"te":
                    if value != b"trailers":
                        raise StreamError(stream_id, PROTOCOL_ERROR, "te other than trailers")
                elif name not in _RESERVED:
                    text = name.decode("ascii")
                    if text.endswith("-bin"):
                        metadata.append((text, base64.b64decode(value + b"=" * (-len(value) % 4))))
                    else:
                        metadata.append((text, value.decode("utf-8", "replace")))
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            self._reject(stream_id, request, INTERNAL, f"bad request headers: {exc}")
            return request
        if not method or not scheme or not path:
            raise StreamError(stream_id, PROTOCOL_ERROR, "a request without :method, :scheme or :path (or empty)")
        request.path = path.decode("ascii", "replace")
        request.metadata = tuple(metadata)
        if method != b"POST":
            self._reject(stream_id, request, UNIMPLEMENTED, "only POST is served")
        elif not _is_grpc(content_type):
            details = f"content-type {_shown(content_type)} is not gRPC"
            self._reject(stream_id, request, INTERNAL, details)
        elif encoding != b"identity" and encoding not in _DECOMPRESSORS:
            self._reject(stream_id, request, UNIMPLEMENTED, f"grpc-encoding {_shown(encoding)} is not supported")
        request.encoding = encoding
        return request

    def _headers(self, stream_id, stream, headers, end_stream, events) -> None:
        if not end_stream:  # trailers from the client: a unary request has none, and they must end it
            raise StreamError(stream_id, PROTOCOL_ERROR, "a second HEADERS without END_STREAM")
        if any(name[:1] == b":" for name, _ in headers):
            raise StreamError(stream_id, PROTOCOL_ERROR, "a pseudo-header in trailers")

    def _reject(self, stream_id: int, request: _Request, code: int, details: str) -> None:
        """Answer at once; the client's remaining DATA is dropped (and credited) until it ends its half."""
        request.answered = True
        request.body = bytearray()
        self._release(request)
        self._trailers_only(stream_id, code, details)

    def _data(self, stream_id, stream, data, end_stream, events) -> bool:
        if stream.answered:
            return False
        fresh = len(stream.body) < 5
        stream.body += data
        if fresh and len(stream.body) >= 5 and int.from_bytes(stream.body[1:5], "big") > self.limits.max_message_size:
            limit = self.limits.max_message_size  # announced in the message prefix: refused before it arrives
            details = f"request over the {limit} byte limit (H2_MAX_MESSAGE_SIZE)"
            self._reject(stream_id, stream, RESOURCE_EXHAUSTED, details)
            return False
        if len(stream.body) > self.limits.max_message_size + 5:
            limit = self.limits.max_message_size
            details = f"request over the {limit} byte limit (H2_MAX_MESSAGE_SIZE)"
            self._reject(stream_id, stream, RESOURCE_EXHAUSTED, details)
            return False
        return True

    def _complete(self, stream_id: int, request: _Request, events: list) -> None:
        if request.answered:
            return  # refused earlier; the client has now ended its half
        try:
            compressed, message = split_message(request.body, request.encoding)
        except BadMessage as exc:
            request.answered = True
            self._trailers_only(stream_id, CODE_OF[type(exc)], f"bad request body: {exc}")
            return
        finally:
            request.body = bytearray()
        self._handling.add(stream_id)
        encoding = request.encoding if compressed else b"identity"
        events.append(RequestReceived(stream_id, request.path, message, request.timeout, request.metadata, encoding))

    def _reset_by_peer(self, stream_id, error_code, events) -> None:
        events.append(RequestCancelled(stream_id))

    def _reset_here(self, stream_id, code, reason, events) -> None:
        events.append(RequestCancelled(stream_id))

    def _goaway_received(self, last_stream_id, error_code, events) -> None:
        pass  # the client stops sending; replies to what it sent still go out

    def connection_lost(self, reason: str) -> list:
        self.closed = True
        cancelled = [RequestCancelled(stream_id) for stream_id in self.streams]
        self._forget_streams()
        return cancelled

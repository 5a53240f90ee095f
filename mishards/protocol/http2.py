"""HTTP/2 framing for unary gRPC, without I/O: what client and server connections share.

Why the proxy speaks HTTP/2 itself: through grpcio's asyncio API a proxied search cost ~1 ms of
CPU on this machine class before Mishards did any work of its own; the same traffic framed here
costs about a third. The subset is what unary gRPC needs, complete for it: SETTINGS and their
ACKs, flow control in both directions, HPACK (decoded by the `hpack` package; our own header
blocks are literals that never touch the dynamic tables, so no encoder state exists), HEADERS with
CONTINUATION, padding and priority, RST_STREAM, GOAWAY, PING.

Because the server side faces every client, this module is hostile-input code (docs/front-door.md):
- each stream is in one explicit state, changed only through `TRANSITIONS`; a frame with no entry
  there is an error by construction, answered with the code RFC 9113 names;
- the work a frame causes is O(1), or O(streams it actually unblocks): streams waiting for the
  peer's connection window wait in one queue, streams waiting for their own window wait apart;
- every buffer is bounded: frames above the size we advertised are refused from their 9-byte
  header, header blocks and CONTINUATION runs are capped, request bytes are counted per
  connection and per process (`BufferPool`), and flow-control credit is given back as bytes are
  taken into a request's buffer within those limits, so a peer cannot park unbounded data here;
- control frames have budgets (`Budget`): a peer that floods resets, PINGs, SETTINGS or empty
  frames is told ENHANCE_YOUR_CALM and dropped; control frames of any kind beyond what the
  peer's own traffic accounts for (`Pacer`) make the adapter pause reading (`read_pause`).

A connection is fed received bytes with the current time (`receive(data, now)`) and returns
events; what it wants to send accumulates and is taken by `data_to_send`. The adapter
(`mishards/protocol/server.py`) owns sockets and time, and calls `expire(now)` about once a second.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_HEADER_LIST_SIZE = 6
# error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT = 0, 1, 2, 3, 4
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
LARGEST_FRAME = 2**24 - 1
UINT32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

# stream states (RFC 9113 section 5.1; a unary peer never reserves streams)
IDLE, OPEN, CLOSED = "idle", "open", "closed"
HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE = "half_closed_local", "half_closed_remote"
# what happens to a stream
SEND_HEADERS, SEND_END_STREAM, RECV_HEADERS, RECV_DATA, RECV_END_STREAM, SEND_RESET, RECV_RESET = (
    "send_headers",
    "send_end_stream",
    "recv_headers",
    "recv_data",
    "recv_end_stream",
    "send_reset",
    "recv_reset",
)

#: (state, what happens) -> next state. What is missing is an error: `Stream.move` raises
#: `StreamError(STREAM_CLOSED)` for input on a half-closed or closed stream, which is what
#: RFC 9113 section 5.1 requires; sending on such a stream is a bug of ours (also refused).
TRANSITIONS: dict[tuple[str, str], str] = {
    (IDLE, SEND_HEADERS): OPEN,
    (IDLE, RECV_HEADERS): OPEN,
    (OPEN, SEND_HEADERS): OPEN,
    (OPEN, RECV_HEADERS): OPEN,
    (OPEN, RECV_DATA): OPEN,
    (OPEN, SEND_END_STREAM): HALF_CLOSED_LOCAL,
    (OPEN, RECV_END_STREAM): HALF_CLOSED_REMOTE,
    (OPEN, SEND_RESET): CLOSED,
    (OPEN, RECV_RESET): CLOSED,
    (HALF_CLOSED_LOCAL, RECV_HEADERS): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_DATA): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_END_STREAM): CLOSED,
    (HALF_CLOSED_LOCAL, SEND_RESET): CLOSED,
    (HALF_CLOSED_LOCAL, RECV_RESET): CLOSED,
    (HALF_CLOSED_REMOTE, SEND_HEADERS): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, SEND_END_STREAM): CLOSED,
    (HALF_CLOSED_REMOTE, SEND_RESET): CLOSED,
    (HALF_CLOSED_REMOTE, RECV_RESET): CLOSED,
}

_RECEIVING = frozenset((OPEN, HALF_CLOSED_LOCAL))  # states in which the peer may still send DATA
# where a stream with something to send waits
_NOT_WAITING, _ON_CONNECTION, _ON_STREAM = 0, 1, 2


class ProtocolError(Exception):
    """A connection error: the peer broke HTTP/2 (or ran out of a budget); GOAWAY with `code`."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamError(Exception):
    """A stream error: RST_STREAM with `code` on that stream; the connection goes on."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    """What one peer may cost (docs/front-door.md has the reasons and the settings behind each)."""

    max_concurrent_streams: int = 1024
    max_header_list_size: int = 16_384  # decoded headers per stream; more is a stream-level answer
    max_header_block: int = 256 * 1024  # compressed block, and decoded size: more ends the connection
    max_continuations: int = 64
    max_message_size: int = 256 * 1024 * 1024
    connection_buffer: int = 64 * 1024 * 1024
    abuse_window: float = 10.0
    max_resets: int = 200
    max_pings: int = 100
    max_settings: int = 100
    max_empty_frames: int = 1000
    max_control_frames: int = 10_000  # unearned control frames per window; more pauses reading
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    read_timeout: float = 30.0
    max_connections: int = 4096  # the server's, not one connection's
    probation: float = 10.0  # the server's: how long an abuser's address stays on probation (0: off)
    max_buffered: int = 1 << 30  # request bytes buffered by the whole process


DEFAULT_LIMITS = Limits()


class BufferPool:
    """Request bytes buffered by every connection of one process, against one cap."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int = 1 << 30) -> None:
        self.cap = cap
        self.used = 0


class Budget:
    """A token bucket: `size` tokens, refilled at `size` per `window` seconds."""

    __slots__ = ("size", "rate", "tokens", "stamp")

    def __init__(self, size: int, window: float, now: float) -> None:
        self.size = size
        self.rate = size / window if window > 0 else float("inf")
        self.tokens = float(size)
        self.stamp = now

    def take(self, now: float, count: int = 1) -> bool:
        tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < count:
            self.tokens = max(tokens - count, 0.0)
            return False
        self.tokens = tokens - count
        return True


class Pacer(Budget):
    """A token bucket that may run into debt: spending (`tokens -= n`) never fails, and the debt
    says how long the spender must wait. Reading from a peer pauses for that long instead of
    ending its connection: a flood of frames that are each legal costs its sender time, not us CPU."""

    __slots__ = ()

    def debt(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0.0: spend on)."""
        tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.tokens = tokens
        self.stamp = now
        return -tokens / self.rate if tokens < 0 else 0.0


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((kind, flags)) + UINT32.pack(stream_id)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(value: bytes) -> bytes:
    return hpack_int(len(value), 7, 0) + value  # raw octets, no Huffman


def literal(name: bytes, value: bytes) -> bytes:
    """'Literal header field without indexing -- new name': leaves both dynamic tables alone."""
    return b"\x00" + hpack_string(name) + hpack_string(value)


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """The same with a name from the static table (1 :authority, 4 :path, 31 content-type, ...)."""
    return hpack_int(index, 4, 0x00) + hpack_string(value)


Headers = list[tuple[bytes, bytes]]
_STATIC = HeaderTable.STATIC_TABLE  # RFC 7541 appendix A, index 1 first


def decode_plain_block(block: bytes, limit: int) -> Headers | None:
    """Decode a header block that cannot touch the HPACK dynamic table, or None to let the full
    decoder do it. Understood: indexed fields from the static table, and literals without indexing
    or never indexed whose name is new or from the static table, with strings not Huffman-coded --
    what our own peers (and gRPC servers' trailers) send every time. Anything else (a dynamic-table
    reference, incremental indexing, a table size update, Huffman, a malformed block) returns None
    before any state changed, so the full decoder sees the block as if this one had never looked.
    Decoded size is bounded as the full decoder bounds it (name + value + 32 per field)."""
    headers = []
    size = 0
    position = 0
    end = len(block)
    static = _STATIC
    while position < end:
        first = block[position]
        if first & 0x80:  # indexed field
            index, position = _prefixed_int(block, position, 0x7F)
            if not 0 < index <= 61:
                return None  # 0 is an error; above 61 a dynamic-table entry
            name, value = static[index - 1]
        elif first & 0xE0 == 0 or first & 0xF0 == 0x10:  # literal without indexing, never indexed
            index, position = _prefixed_int(block, position, 0x0F)
            if index:
                if index > 61:
                    return None
                name = static[index - 1][0]
            else:
                new_name, position = _plain_string(block, position)
                if new_name is None:
                    return None
                name = new_name
            literal_value, position = _plain_string(block, position)
            if literal_value is None:
                return None
            value = literal_value
        else:
            return None  # incremental indexing or a table size update: the table changes
        if position < 0:
            return None
        size += len(name) + len(value) + 32
        if size > limit:
            return None  # the full decoder refuses it with its own error
        headers.append((name, value))
    return headers


def _prefixed_int(block: bytes, position: int, mask: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) at `position`; the position after it, -1 if cut short or
    longer than 4 bytes of continuation (more than any length we accept)."""
    value = block[position] & mask
    position += 1
    if value < mask:
        return value, position
    shift = 0
    for _ in range(4):
        if position >= len(block):
            return 0, -1
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return 0, -1


def _plain_string(block: bytes, position: int) -> tuple[bytes | None, int]:
    """A string literal that is not Huffman-coded, or None (Huffman, cut short)."""
    if position < 0 or position >= len(block) or block[position] & 0x80:
        return None, -1
    length, position = _prefixed_int(block, position, 0x7F)
    if position < 0 or position + length > len(block):
        return None, -1
    return block[position : position + length], position + length


class Stream:
    """One stream: its state, what is left to send and the windows both ways."""

    __slots__ = (
        "state",
        "head",
        "pending",
        "window",
        "end_after",
        "waiting",
        "body",
        "recv_window",
        "owed",
        "kept",
        "starved",
    )

    def __init__(self, window: int, recv_window: int) -> None:
        self.state = IDLE
        self.head = b""  # a few bytes to send before `pending` (gRPC's message prefix)
        self.pending = memoryview(b"")  # DATA not yet sent (waiting for window)
        self.window = window  # what we may still send on this stream
        self.end_after: bytes | None = None  # trailers (server) to send once `pending` is out
        self.waiting = _NOT_WAITING
        self.body = bytearray()
        self.recv_window = recv_window  # what the peer may still send on this stream
        self.owed = 0  # bytes received and taken, not yet credited back to the peer
        self.kept = 0  # bytes of `body` counted against the buffer limits
        self.starved = False  # credit withheld by the buffer limits

    def move(self, stream_id: int, event: str) -> None:
        following = TRANSITIONS.get((self.state, event))
        if following is None:
            raise StreamError(stream_id, STREAM_CLOSED, f"{event.replace('_', ' ')} on a {self.state} stream")
        self.state = following


S = TypeVar("S", bound=Stream)  # what a connection keeps per stream (a call, a request)


class Connection(Generic[S]):
    """Framing, settings, flow control, header blocks and budgets; subclasses give streams their meaning."""

    #: the stream window we advertise, and the connection window we open right after the preface
    STREAM_WINDOW = MAX_WINDOW
    CONNECTION_WINDOW = MAX_WINDOW
    MAX_FRAME = DEFAULT_MAX_FRAME  # the largest frame we accept (peers split DATA to it)
    #: whether the limits on what we keep apply (the server's; a node's replies are trusted more)
    BOUNDED = False
    PEER_STARTS_ODD = False  # which stream ids the peer opens (odd: it is the client)
    OPENING = b""  # what this side sends before its SETTINGS (the client's preface)
    #: frames handled per `receive` call; the rest stays buffered, `backlog` is set, and the adapter
    #: calls `receive(b"")` on its next turn: a flood of small frames cannot hold the event loop
    FRAMES_PER_CALL = 1 << 30

    def __init__(
        self, limits: Limits = DEFAULT_LIMITS, pool: BufferPool | None = None, now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        self.limits = limits
        self.pool = pool if pool is not None else BufferPool()
        self._out: list[bytes | memoryview] = []  # frames (and DATA payload views) to send, joined once
        self._in = bytearray()
        self.streams: dict[int, S] = {}
        self._conn_blocked: deque[int] = deque()  # streams with DATA waiting for the connection window
        self._decoder = Decoder(max_header_list_size=limits.max_header_block)
        self._peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_streams = 2**31
        self._send_window = DEFAULT_WINDOW  # connection level, ours to use
        self._recv_window = DEFAULT_WINDOW  # connection level, the peer's to use
        self._conn_owed = 0  # connection-level bytes taken and not yet credited back
        self._buffered = 0  # bytes of unfinished requests kept by this connection
        self._starved: deque[int] = deque()  # streams whose credit waits for buffer room
        self._receiving: dict[int, float] = {}  # streams the peer still sends on -> last byte (oldest first)
        self._opened: deque[int] = deque()  # the same ids by age, for "the oldest unfinished request"
        self._recently_reset: dict[int, None] = {}  # ids we reset: late frames on them are ignored
        self._highest_peer_stream = 0
        self._header_stream = 0  # stream whose header block continues in CONTINUATION frames
        self._header_block = bytearray()
        self._header_end_stream = False
        self._header_pieces = 0
        self._header_refused = 0  # a stream error to answer once the block is decoded (HPACK state)
        self._indexed_blocks: dict[bytes, Headers] = {}
        self._plain_blocks: dict[bytes, Headers] = {}  # decoded by `decode_plain_block`
        self._pings = Budget(limits.max_pings, limits.abuse_window, now)
        self._settings_budget = Budget(limits.max_settings, limits.abuse_window, now)
        self._empty = Budget(limits.max_empty_frames, limits.abuse_window, now)
        self._resets = Budget(limits.max_resets, limits.abuse_window, now)
        # control frames beyond what the peer's own traffic accounts for pause reading (`read_pause`)
        self._chatter = Pacer(limits.max_control_frames, limits.abuse_window, now)
        self.handled = 0  # frames handled by the last `receive`
        self.last_received = now
        self._awaiting_settings = True  # a peer's preface is a SETTINGS frame
        self.backlog = False  # complete frames left unhandled by the last `receive` (FRAMES_PER_CALL)
        self.failed_with: int | None = None  # the GOAWAY code of a connection error we ended it with
        self.closed = False
        self._out.append(self.OPENING + self._local_settings())

    def _local_settings(self) -> bytes:
        settings = _SETTING.pack(ENABLE_PUSH, 0) + _SETTING.pack(INITIAL_WINDOW_SIZE, self.STREAM_WINDOW)
        if self.BOUNDED:
            settings += _SETTING.pack(MAX_CONCURRENT_STREAMS, self.limits.max_concurrent_streams)
            settings += _SETTING.pack(MAX_HEADER_LIST_SIZE, self.limits.max_header_list_size)
        if self.MAX_FRAME != DEFAULT_MAX_FRAME:
            settings += _SETTING.pack(MAX_FRAME_SIZE, self.MAX_FRAME)
        out = frame(SETTINGS, 0, 0, settings)
        if self.CONNECTION_WINDOW > DEFAULT_WINDOW:
            out += frame(WINDOW_UPDATE, 0, 0, UINT32.pack(self.CONNECTION_WINDOW - DEFAULT_WINDOW))
            self._recv_window = self.CONNECTION_WINDOW
        return out

    # ------------------------------------------------------------------ sending
    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self._out.append(frame(kind, flags, stream_id, payload))

    def _send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.move(stream_id, SEND_HEADERS)
        flags = END_STREAM if end_stream else 0
        max_frame = self._peer_max_frame
        if len(block) <= max_frame:
            self._out.append(frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            self._out.append(frame(HEADERS, flags, stream_id, block[:max_frame]))
            rest = block[max_frame:]
            while rest:
                chunk, rest = rest[:max_frame], rest[max_frame:]
                self._out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk))
        if end_stream and stream is not None:
            stream.move(stream_id, SEND_END_STREAM)
            self._ended_locally(stream_id, stream)

    def _send_body(
        self, stream_id: int, stream: S, head: bytes, body: bytes | memoryview, end_after: bytes | None
    ) -> None:
        """Queue `head` + `body` as DATA (END_STREAM on the last frame when `end_after` is None,
        else the trailers `end_after` after it); the body is sent from views, never copied whole."""
        stream.head = head
        stream.pending = memoryview(body)
        stream.end_after = end_after
        self._chatter.tokens += 2 + (len(body) >> 13)  # a WINDOW_UPDATE per 16 KiB frame, on both levels
        self._drain(stream_id, stream)

    def _drain(self, stream_id: int, stream: S) -> bool:
        """Send what the windows allow; True when the body (and trailers) are out. A stream that
        cannot go on waits on the window that stopped it."""
        head, pending, trailers = stream.head, stream.pending, stream.end_after
        while head or pending:
            size = min(len(head) + len(pending), stream.window, self._send_window, self._peer_max_frame)
            if size <= 0:
                stream.head, stream.pending = head, pending
                if stream.window <= 0:
                    stream.waiting = _ON_STREAM
                else:
                    stream.waiting = _ON_CONNECTION
                    self._conn_blocked.append(stream_id)
                return False
            if head:  # the first frame: the small head and the start of the body, joined
                taken = min(len(head), size)
                chunk: bytes | memoryview = head[:taken] + bytes(pending[: size - taken])
                head, pending = head[taken:], pending[size - taken :]
            else:  # a view of the body: copied once, when the frames are joined
                chunk, pending = pending[:size], pending[size:]
            stream.window -= size
            self._send_window -= size
            last = not head and not pending and trailers is None
            self._out.append(frame_header(size, DATA, END_STREAM if last else 0, stream_id))
            self._out.append(chunk)
            if last:
                stream.head, stream.pending = head, pending
                stream.move(stream_id, SEND_END_STREAM)
                self._ended_locally(stream_id, stream)
                return True
        stream.head, stream.pending = head, pending
        stream.waiting = _NOT_WAITING
        if trailers is not None:
            stream.end_after = None
            self._send_headers(stream_id, trailers, end_stream=True)
        return True

    def _resume_connection_blocked(self) -> None:
        """The connection window opened: streams waiting for it go on, oldest first, until it is
        used up again. Each one looked at either sends or leaves the queue: O(streams unblocked)."""
        queue = self._conn_blocked
        while queue and self._send_window > 0:
            stream_id = queue.popleft()
            stream = self.streams.get(stream_id)
            if stream is None or stream.waiting != _ON_CONNECTION:
                continue
            stream.waiting = _NOT_WAITING
            if not self._drain(stream_id, stream) and stream.waiting == _ON_CONNECTION:
                queue.pop()  # `_drain` appended it; it keeps its place at the front
                queue.appendleft(stream_id)
                return

    def _stream_window_opened(self, stream_id: int, stream: S) -> None:
        if stream.waiting != _ON_STREAM or stream.window <= 0:
            return
        if self._send_window > 0 and not self._conn_blocked:
            stream.waiting = _NOT_WAITING
            self._drain(stream_id, stream)
        else:
            stream.waiting = _ON_CONNECTION
            self._conn_blocked.append(stream_id)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Forget a stream and tell the peer."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.move(stream_id, SEND_RESET)
            self._close(stream_id, stream, reset_here=True)
            if not self.closed:
                self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(error_code)))

    def refuse(self, stream_id: int, error_code: int) -> None:
        """Reset a stream the peer opened and we never took; frames still in flight on it are ignored."""
        self._recently_reset[stream_id] = None
        self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(error_code)))

    def ping(self, opaque: bytes) -> None:
        self._out.append(frame(PING, 0, 0, opaque[:8].ljust(8, b"\0")))

    def goaway(self, last_stream_id: int, error_code: int = NO_ERROR, debug: bytes = b"") -> None:
        self._out.append(frame(GOAWAY, 0, 0, UINT32.pack(last_stream_id) + UINT32.pack(error_code) + debug))

    # ------------------------------------------------------------------ stream bookkeeping
    def _opened_stream(self, stream_id: int, stream: S, now: float) -> None:
        """A stream the peer will send on (its request, or the reply to ours)."""
        self.streams[stream_id] = stream
        self._receiving[stream_id] = now
        self._opened.append(stream_id)
        self._chatter.tokens += 2  # its RST_STREAM, PRIORITY or WINDOW_UPDATE is fair

    def _ended_locally(self, stream_id: int, stream: S) -> None:
        if stream.state == CLOSED:
            self._close(stream_id, stream, reset_here=False)

    def _ended_remotely(self, stream_id: int, stream: S) -> None:
        """The peer's half is done: its bytes are no longer ours to bound, its credit is due."""
        self._receiving.pop(stream_id, None)
        self._release(stream)
        if stream.state == CLOSED:
            self._close(stream_id, stream, reset_here=False)

    def _close(self, stream_id: int, stream: S, reset_here: bool) -> None:
        stream.state = CLOSED
        self.streams.pop(stream_id, None)
        self._receiving.pop(stream_id, None)
        self._release(stream)
        stream.pending = memoryview(b"")
        if reset_here:
            recent = self._recently_reset
            recent[stream_id] = None
            if len(recent) > 4096:
                del recent[next(iter(recent))]
        self._closed_stream(stream_id)

    def _closed_stream(self, stream_id: int) -> None:
        """A stream left `streams` (hook)."""

    def _release(self, stream: S) -> None:
        """A request's bytes are no longer buffered here: they count no more, and are credited."""
        if not (stream.kept or stream.owed):
            return
        if stream.kept:
            self._buffered -= stream.kept
            self.pool.used -= stream.kept
            stream.kept = 0
        if stream.owed:
            self._conn_owed += stream.owed
            stream.owed = 0
        stream.starved = False
        self._credit_connection()
        if self._starved:
            self._feed_starved()

    def _is_idle(self, stream_id: int) -> bool:
        """Never opened: an id the peer has not used yet (or one that only we could open)."""
        if (stream_id % 2 == 1) == self.PEER_STARTS_ODD:
            return stream_id > self._highest_peer_stream
        return self._is_idle_local(stream_id)

    def _is_idle_local(self, stream_id: int) -> bool:
        return True

    # ------------------------------------------------------------------ flow control, receiving side
    def _take(self, stream_id: int, stream: S, size: int, kept: int) -> None:
        """A DATA frame of `size` bytes was taken, `kept` of them into the request's buffer (the
        rest, padding or a refused request's bytes, dropped); give the credit back in batches of
        half a window, for kept bytes only while the buffer limits allow it."""
        stream.owed += size
        if kept:
            stream.kept += kept
            self._buffered += kept
            self.pool.used += kept
        if stream.owed >= self.STREAM_WINDOW // 2 or stream.recv_window <= 0:
            self._settle(stream_id, stream, force=not kept)

    def _room_for(self, stream_id: int) -> bool:
        if not self.BOUNDED:
            return True
        if self.pool.used > self.pool.cap:
            return False
        return self._buffered <= self.limits.connection_buffer or stream_id == self._oldest_receiving()

    def _oldest_receiving(self) -> int:
        opened = self._opened
        while opened and opened[0] not in self._receiving:
            opened.popleft()
        return opened[0] if opened else 0

    def _settle(self, stream_id: int, stream: S, force: bool = False) -> None:
        if not stream.owed:
            return
        if not force and not self._room_for(stream_id):
            if not stream.starved:
                stream.starved = True
                self._starved.append(stream_id)
            return
        if stream.state in _RECEIVING:
            self._out.append(frame(WINDOW_UPDATE, 0, stream_id, UINT32.pack(stream.owed)))
            stream.recv_window += stream.owed
        self._conn_owed += stream.owed
        stream.owed = 0
        self._credit_connection()

    def _credit_connection(self) -> None:
        if self._conn_owed >= self.CONNECTION_WINDOW // 4 or (self._conn_owed and self._recv_window <= 0):
            self._out.append(frame(WINDOW_UPDATE, 0, 0, UINT32.pack(self._conn_owed)))
            self._recv_window += self._conn_owed
            self._conn_owed = 0

    def _feed_starved(self) -> None:
        """Buffer room came back: credit the streams that waited, in order, while it lasts."""
        queue = self._starved
        while queue:
            stream_id = queue[0]
            stream = self.streams.get(stream_id)
            if stream is None or not stream.starved:
                queue.popleft()
                continue
            if not self._room_for(stream_id):
                return
            queue.popleft()
            stream.starved = False
            self._settle(stream_id, stream)

    # ------------------------------------------------------------------ receiving
    def read_pause(self, now: float) -> float:
        """Seconds the adapter should stop reading from the peer: it sent more control frames
        (WINDOW_UPDATE, PING, SETTINGS, RST_STREAM, PRIORITY, empty or unknown frames) than the
        `max_control_frames` per window its own requests and our replies account for."""
        return self._chatter.debt(now)

    def receive(self, data: bytes, now: float | None = None) -> list:
        """Parse what arrived; the events it completes. A connection error sends GOAWAY, closes the
        connection and ends with the events of `connection_lost`; a stream error resets the stream.

        Frames are read in place (through a memoryview of `data`, or of the carried-over partial
        frame plus `data`) and DATA payloads are copied once, into their stream's body: a 200 MB
        insert passes through here."""
        if self.closed:
            return []
        now = time.monotonic() if now is None else now
        if data:
            self.last_received = now
        self.backlog = False
        buffer = self._in
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            source = data
        events: list = []
        position = 0
        try:
            with memoryview(source) as view:
                position = self._preface(source)
                available = len(source)
                limit = self.MAX_FRAME
                budget = self.FRAMES_PER_CALL
                while available - position >= 9:
                    if not budget:  # the rest waits for `receive(b"")`: other peers take their turn
                        self.backlog = True
                        break
                    budget -= 1
                    length = int.from_bytes(view[position : position + 3], "big")
                    if length > limit:  # refused from its header: a huge frame is never buffered
                        raise ProtocolError(f"frame of {length} bytes, over the {limit} we accept", FRAME_SIZE_ERROR)
                    end = position + 9 + length
                    if end > available:
                        break
                    kind = view[position + 3]
                    flags = view[position + 4]
                    stream_id = UINT32.unpack_from(view, position + 5)[0] & MAX_STREAM_ID
                    if self._header_stream and kind != CONTINUATION:
                        raise ProtocolError("header block interrupted by another frame")
                    if self._awaiting_settings:
                        if kind != SETTINGS or flags & ACK:
                            raise ProtocolError("the peer's first frame is not SETTINGS")
                        self._awaiting_settings = False
                    try:
                        if kind == DATA:
                            with view[position + 9 : end] as payload:
                                self._data_frame(flags, stream_id, payload, now, events)
                        else:
                            self._frame(kind, flags, stream_id, bytes(view[position + 9 : end]), now, events)
                    except StreamError as exc:
                        self._stream_error(exc, events)
                    position = end
                    if self.closed:
                        break
                self.handled = self.FRAMES_PER_CALL - budget
        except (ProtocolError, HPACKError, struct.error, ValueError) as exc:
            buffer.clear()
            code = getattr(exc, "code", PROTOCOL_ERROR)
            debug = str(exc).encode()[:256]
            if isinstance(exc, OversizedHeaderListError):  # an HPACK bomb: decoding stopped at the limit
                code, debug = ENHANCE_YOUR_CALM, b"too_many_header_bytes"
            elif isinstance(exc, HPACKError):
                code = COMPRESSION_ERROR
            return events + self.fail(code, f"HTTP/2 protocol error: {exc}", debug)
        if self.closed:
            buffer.clear()
            return events
        if source is buffer:
            del buffer[:position]
        elif position < len(data):
            buffer += data[position:]  # a partial frame waits for the rest
        return events

    def fail(self, code: int, reason: str, debug: bytes = b"") -> list:
        """End the connection with GOAWAY(code); the events that ends."""
        if not self.closed:
            self.failed_with = code
            self.goaway(self._highest_peer_stream, code, debug or reason.encode()[:256])
        return self.connection_lost(reason)

    def _stream_error(self, exc: StreamError, events: list) -> None:
        stream_id = exc.stream_id
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.reset(stream_id, exc.code)
            self._reset_here(stream_id, exc.code, str(exc), events)
        else:
            self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(exc.code)))

    def _reset_here(self, stream_id: int, code: int, reason: str, events: list) -> None:
        """We reset a live stream because of what the peer did (hook: tell the handler or caller)."""

    def _preface(self, buffer: bytes | bytearray) -> int:
        """Bytes to skip before the first frame (the server checks the client preface here)."""
        return 0

    @staticmethod
    def _spend(budget: Budget, what: str, now: float, count: int = 1) -> None:
        """A frame of a budgeted kind (`count` tokens for a large one); past the budget,
        ENHANCE_YOUR_CALM with `what` as debug data."""
        if not budget.take(now, count):
            raise ProtocolError(what, ENHANCE_YOUR_CALM)

    def _data_frame(self, flags: int, stream_id: int, payload: memoryview, now: float, events: list) -> None:
        if not stream_id:
            raise ProtocolError("DATA on stream 0")
        size = len(payload)
        if size > self._recv_window:
            raise ProtocolError(f"DATA of {size} bytes beyond the connection window", FLOW_CONTROL_ERROR)
        self._recv_window -= size
        end_stream = bool(flags & END_STREAM)
        if not size and not end_stream:
            self._spend(self._empty, "too_many_empty_frames", now)
            self._chatter.tokens -= 1
        stream = self.streams.get(stream_id)
        if stream is None or stream.state not in _RECEIVING:
            self._conn_owed += size  # dropped: the connection's credit comes back at once
            self._credit_connection()
            if stream is not None:
                stream.move(stream_id, RECV_DATA)  # no such transition: STREAM_CLOSED
            if self._is_idle(stream_id):
                raise ProtocolError(f"DATA on idle stream {stream_id}")
            if stream_id in self._recently_reset:
                return  # in flight when we reset it
            raise StreamError(stream_id, STREAM_CLOSED, f"DATA on closed stream {stream_id}")
        if size > stream.recv_window:
            self._conn_owed += size
            self._credit_connection()
            raise StreamError(stream_id, FLOW_CONTROL_ERROR, f"DATA of {size} bytes beyond the stream window")
        stream.recv_window -= size
        if self.BOUNDED and stream_id in self._receiving:
            del self._receiving[stream_id]  # most recently active last: read timeouts pop from the front
            self._receiving[stream_id] = now
        data = self._unpad(flags, payload)
        kept = self._data(stream_id, stream, data, end_stream, events)
        if stream_id in self.streams:
            self._take(stream_id, stream, size, len(data) if kept else 0)
            if end_stream and stream_id in self.streams:
                stream.move(stream_id, RECV_END_STREAM)
                self._ended_remotely(stream_id, stream)
                self._complete(stream_id, stream, events)
        else:  # the stream ended while the data was handled (rejected, reset)
            self._conn_owed += size
            self._credit_connection()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, now: float, events: list) -> None:
        if kind != HEADERS and kind != CONTINUATION:
            self._chatter.tokens -= 1 + len(payload) // 384  # a token per 64 SETTINGS entries too
        if kind == HEADERS:
            self._headers_frame(flags, stream_id, payload, now, events)
        elif kind == CONTINUATION:
            if not stream_id or stream_id != self._header_stream:
                raise ProtocolError("CONTINUATION without a header block in progress on its stream")
            self._header_pieces += 1
            if self._header_pieces > self.limits.max_continuations:
                raise ProtocolError("too_many_continuations", ENHANCE_YOUR_CALM)
            if not payload and not flags & END_HEADERS:
                self._spend(self._empty, "too_many_empty_frames", now)
            self._append_block(payload)
            if flags & END_HEADERS:
                self._header_stream = 0
                self._header_block_done(stream_id, now, events)
        elif kind == SETTINGS:
            if stream_id:
                raise ProtocolError("SETTINGS on a stream")
            if flags & ACK:
                if payload:
                    raise ProtocolError("SETTINGS ACK with a payload", FRAME_SIZE_ERROR)
                self._settings_acked()
                return
            if len(payload) % 6:
                raise ProtocolError("SETTINGS length not a multiple of 6", FRAME_SIZE_ERROR)
            # a frame of many entries costs like several frames: a token per 64 entries
            self._spend(self._settings_budget, "too_many_settings", now, 1 + len(payload) // (6 * 64))
            self._settings(payload)
            # the ACK goes out before any DATA the new windows allow: peers enforce a setting
            # from the moment it is acknowledged
            self._out.append(frame(SETTINGS, ACK, 0))
            self._settings_applied()
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if stream_id:
                raise ProtocolError("PING on a stream")
            if len(payload) != 8:
                raise ProtocolError("PING length not 8", FRAME_SIZE_ERROR)
            if flags & ACK:
                self._ping_acked(payload, events)
            else:
                self._spend(self._pings, "too_many_pings", now)
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if not stream_id:
                raise ProtocolError("RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ProtocolError("RST_STREAM length not 4", FRAME_SIZE_ERROR)
            if self._is_idle(stream_id) and stream_id not in self.streams:
                raise ProtocolError(f"RST_STREAM on idle stream {stream_id}")
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._spend(self._resets, "too_many_resets", now)
                stream.move(stream_id, RECV_RESET)
                self._close(stream_id, stream, reset_here=False)
                self._reset_by_peer(stream_id, UINT32.unpack(payload)[0], events)
        elif kind == PRIORITY:
            if not stream_id:
                raise ProtocolError("PRIORITY on stream 0")
            if len(payload) != 5:
                raise StreamError(stream_id, FRAME_SIZE_ERROR, "PRIORITY length not 5")
            self._spend(self._empty, "too_many_empty_frames", now)
            if UINT32.unpack_from(payload)[0] & MAX_STREAM_ID == stream_id:
                raise StreamError(stream_id, PROTOCOL_ERROR, "a stream cannot depend on itself")
        elif kind == GOAWAY:
            if stream_id:
                raise ProtocolError("GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError("GOAWAY shorter than 8 bytes", FRAME_SIZE_ERROR)
            last_id = UINT32.unpack(payload[:4])[0] & MAX_STREAM_ID
            self._goaway_received(last_id, UINT32.unpack(payload[4:8])[0], events)
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE although push is disabled")
        else:  # unknown frame types are ignored, as RFC 9113 asks, within the budget
            self._spend(self._empty, "too_many_empty_frames", now)

    def _headers_frame(self, flags: int, stream_id: int, payload: bytes, now: float, events: list) -> None:
        if not stream_id:
            raise ProtocolError("HEADERS on stream 0")
        payload = self._unpad(flags, payload)
        self._header_refused = 0
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError("HEADERS priority field cut short", FRAME_SIZE_ERROR)
            if UINT32.unpack_from(payload)[0] & MAX_STREAM_ID == stream_id:
                self._header_refused = PROTOCOL_ERROR  # answered once the block is decoded
            payload = payload[5:]
        if not payload and not flags & END_HEADERS:
            self._spend(self._empty, "too_many_empty_frames", now)
        self._header_block = bytearray()
        self._header_pieces = 0
        self._append_block(payload)
        self._header_end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block_done(stream_id, now, events)
        else:
            self._header_stream = stream_id

    def _append_block(self, payload: bytes) -> None:
        self._header_block += payload
        if len(self._header_block) > self.limits.max_header_block:
            raise ProtocolError("too_many_header_bytes", ENHANCE_YOUR_CALM)  # over `max_header_block`

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE length not 4", FRAME_SIZE_ERROR)
        increment = UINT32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if not increment:
                raise ProtocolError("WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError("connection window above 2^31-1", FLOW_CONTROL_ERROR)
            self._resume_connection_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise ProtocolError(f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # closed: frames in flight are fine
        if not increment:
            raise StreamError(stream_id, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        stream.window += increment
        if stream.window > MAX_WINDOW:
            raise StreamError(stream_id, FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        self._stream_window_opened(stream_id, stream)

    @staticmethod
    def _unpad(flags: int, payload):
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ProtocolError("padding as long as the frame")
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, payload: bytes) -> None:
        """Apply a SETTINGS frame: every value checked, the window change applied once per frame,
        whatever the number of entries (O(entries) + O(streams), not their product)."""
        new_window = None
        for key, value in _SETTING.iter_unpack(payload):
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1", FLOW_CONTROL_ERROR)
                new_window = value
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= LARGEST_FRAME:
                    raise ProtocolError("SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif key == ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError("SETTINGS_ENABLE_PUSH not 0 or 1")
            elif key == MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
        if new_window is not None and new_window != self._peer_window:
            delta = new_window - self._peer_window
            self._peer_window = new_window
            for stream_id, stream in list(self.streams.items()):
                stream.window += delta
                if stream.window > MAX_WINDOW:
                    raise ProtocolError("a stream window above 2^31-1", FLOW_CONTROL_ERROR)
                if delta > 0 and stream.waiting == _ON_STREAM and stream.window > 0:
                    stream.waiting = _ON_CONNECTION  # sent on in `_settings_applied`, after the ACK
                    self._conn_blocked.append(stream_id)

    def _settings_applied(self) -> None:
        """After the ACK: send what the new settings allow."""
        self._resume_connection_blocked()

    def _settings_acked(self) -> None:
        """The peer acknowledged our SETTINGS (hook)."""

    def _decoded(self, block: bytes) -> Headers:
        """The header list of a block: remembered, decoded plainly, or decoded by hpack."""
        if len(block) <= 64 and block and min(block) >= 0x80:
            # Only one-byte "indexed field" representations: they cannot change the dynamic table,
            # so the same bytes decode the same way until a block with literals arrives. Requests
            # from gRPC clients and replies from gRPC servers are such blocks after the first one.
            headers = self._indexed_blocks.get(block)
            if headers is None:
                headers = self._hpack_decoded(block)
                if len(self._indexed_blocks) < 64:
                    self._indexed_blocks[block] = headers
            return headers
        plain = self._plain_blocks.get(block)  # replies and trailers repeat byte for byte
        if plain is None:
            plain = decode_plain_block(block, self.limits.max_header_block)
            if plain is not None and len(block) <= 256:
                if len(self._plain_blocks) >= 64:
                    self._plain_blocks.clear()
                self._plain_blocks[block] = plain
        if plain is not None:
            return plain
        if self._indexed_blocks:  # the dynamic table may change: remembered indexed blocks may not hold
            self._indexed_blocks.clear()
        return self._hpack_decoded(block)

    def _hpack_decoded(self, block: bytes) -> Headers:
        return self._decoder.decode(block, raw=True)  # type: ignore[return-value]  # raw=True: (bytes, bytes) pairs

    def _header_block_done(self, stream_id: int, now: float, events: list) -> None:
        block = bytes(self._header_block)
        self._header_block = bytearray()
        headers = self._decoded(block)
        end_stream = self._header_end_stream
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self._is_idle(stream_id) or (stream_id % 2 == 1) != self.PEER_STARTS_ODD:
                if stream_id in self._recently_reset:
                    return  # in flight when we reset it; decoded above to keep the HPACK state
                raise ProtocolError(f"HEADERS on stream {stream_id}, which cannot be opened now")
            self._highest_peer_stream = stream_id
            if self._header_refused:
                raise StreamError(stream_id, self._header_refused, "a stream cannot depend on itself")
            stream = self._open_by_peer(stream_id, headers, end_stream, now, events)
            if stream is None:
                return
        else:
            if self._header_refused:
                raise StreamError(stream_id, self._header_refused, "a stream cannot depend on itself")
            stream.move(stream_id, RECV_HEADERS)
            self._headers(stream_id, stream, headers, end_stream, events)
        if end_stream and stream_id in self.streams:
            stream.move(stream_id, RECV_END_STREAM)
            self._ended_remotely(stream_id, stream)
            self._complete(stream_id, stream, events)

    # ------------------------------------------------------------------ time
    def expire(self, now: float) -> list:
        """Requests that stopped arriving while they could (`read_timeout` without a byte) are
        reset; a header block or partial frame left hanging ends the connection. The events."""
        events: list = []
        if self.closed:
            return events
        timeout = self.limits.read_timeout
        if (self._in or self._header_stream) and now - self.last_received > timeout:
            return self.fail(PROTOCOL_ERROR, f"a frame left unfinished for {timeout:g} s")
        receiving = self._receiving
        while receiving:
            stream_id, last = next(iter(receiving.items()))
            if now - last <= timeout:
                break
            stream = self.streams.get(stream_id)
            del receiving[stream_id]
            if stream is None:
                continue
            waits_for_us = stream.recv_window <= 0 or self._recv_window <= 0 or stream.starved
            if waits_for_us and self.pool.used <= self.pool.cap:
                receiving[stream_id] = now  # waiting for our credit, not slow: not its fault
                continue
            # (while the whole process is over its buffer cap, stalled requests expire all the
            # same: they free the room the others wait for, so the wait cannot go on for ever)
            self.reset(stream_id, CANCEL)
            self._reset_here(stream_id, CANCEL, f"no request bytes for {timeout:g} s", events)
        return events

    # ------------------------------------------------------------------ subclass hooks
    def _open_by_peer(self, stream_id: int, headers: list, end_stream: bool, now: float, events: list) -> S | None:
        """A new stream from the peer; the stream (registered with `_opened_stream`), or None if refused."""
        raise ProtocolError(f"the peer may not open stream {stream_id}")

    def _headers(self, stream_id: int, stream: S, headers: list, end_stream: bool, events: list) -> None:
        raise NotImplementedError

    def _data(self, stream_id: int, stream: S, data, end_stream: bool, events: list) -> bool:
        """Take DATA; True when it was kept (counted against the buffer limits), False if dropped."""
        raise NotImplementedError

    def _complete(self, stream_id: int, stream: S, events: list) -> None:
        """The peer ended its half of the stream (hook)."""

    def _reset_by_peer(self, stream_id: int, error_code: int, events: list) -> None:
        raise NotImplementedError

    def _goaway_received(self, last_stream_id: int, error_code: int, events: list) -> None:
        raise NotImplementedError

    def _ping_acked(self, opaque: bytes, events: list) -> None:
        pass

    def connection_lost(self, reason: str) -> list:
        """The socket is gone (or the peer broke the protocol); the events that ends."""
        self.closed = True
        self._forget_streams()
        return []

    def _forget_streams(self) -> None:
        """Drop every stream; the bytes they kept leave the process-wide count."""
        for stream in self.streams.values():
            if stream.kept:
                self.pool.used -= stream.kept
                stream.kept = 0
            stream.state = CLOSED
        self._buffered = 0
        self.streams.clear()
        self._receiving.clear()

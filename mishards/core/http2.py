"""HTTP/2 framing for unary gRPC, without I/O: what client and server connections share.

Why the proxy speaks HTTP/2 itself: through grpcio's asyncio API a proxied search cost ~1 ms of
CPU on this machine class before Mishards did any work of its own (serving one call ~0.3 ms,
each backend call ~0.3 ms, completions travelling through a poller thread); the same traffic
framed here costs about a third. The subset is what unary gRPC needs, complete for it:
SETTINGS and their ACKs, flow control in both directions (our DATA waits for the peer's window;
we grant the peer windows as we consume), HPACK (decoded by the `hpack` package; our own header
blocks are literals that never touch the dynamic tables, so no encoder state exists), HEADERS
with CONTINUATION, padding and priority, RST_STREAM, GOAWAY, PING, and bounded frame sizes.

A connection object is fed received bytes (`receive`) and returns events; what it wants to
send accumulates and is taken by `data_to_send`. A peer that breaks the protocol gets a GOAWAY
and the connection is marked closed. The adapter (`mishards/transport.py`) owns sockets and time.
"""

from __future__ import annotations

import struct
from collections import deque

from hpack import Decoder
from hpack.exceptions import HPACKError

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
# error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 7, 8, 9, 11

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_ACCEPTED_FRAME = 2**24 - 1
UINT32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke HTTP/2 (or asked for what this subset refuses); the connection is unusable."""


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


class _Stream:
    """Per-stream state both sides need: what is left to send and the windows for it."""

    __slots__ = ("head", "pending", "window", "end_after", "body", "received")

    def __init__(self, window: int) -> None:
        self.head = b""  # a few bytes to send before `pending` (gRPC's message prefix)
        self.pending = memoryview(b"")  # DATA not yet sent (waiting for window)
        self.window = window  # what we may still send on this stream
        self.end_after: bytes | None = None  # trailers (server) to send once `pending` is out
        self.body = bytearray()
        self.received = 0  # DATA bytes not yet granted back to the peer


class Connection:
    """Framing, settings, flow control and header blocks; subclasses give streams their meaning."""

    #: the stream window we advertise; the connection window is raised to CONNECTION_WINDOW
    STREAM_WINDOW = MAX_WINDOW
    CONNECTION_WINDOW = MAX_WINDOW
    MAX_STREAMS: int | None = None  # what we advertise as MAX_CONCURRENT_STREAMS
    MAX_FRAME = DEFAULT_MAX_FRAME  # the largest frame we accept (peers split DATA to it)

    def __init__(self) -> None:
        self._out: list[bytes | memoryview] = []  # frames (and DATA payload views) to send, joined once
        self._in = bytearray()
        self.streams: dict[int, _Stream] = {}
        self._blocked: deque[int] = deque()  # streams with DATA waiting for window, in order
        self._decoder = Decoder()
        self._peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_streams = 2**31
        self._send_window = DEFAULT_WINDOW  # connection level
        self._unacked = 0  # connection-level bytes received and not yet granted back
        self._header_stream = 0  # stream whose header block continues in CONTINUATION frames
        self._header_block = bytearray()
        self._header_end_stream = False
        self._indexed_blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.closed = False

    def _local_settings(self) -> bytes:
        settings = struct.pack(">HIHI", ENABLE_PUSH, 0, INITIAL_WINDOW_SIZE, self.STREAM_WINDOW)
        if self.MAX_STREAMS is not None:
            settings += struct.pack(">HI", MAX_CONCURRENT_STREAMS, self.MAX_STREAMS)
        if self.MAX_FRAME != DEFAULT_MAX_FRAME:
            settings += struct.pack(">HI", MAX_FRAME_SIZE, self.MAX_FRAME)
        out = frame(SETTINGS, 0, 0, settings)
        if self.CONNECTION_WINDOW > DEFAULT_WINDOW:
            out += frame(WINDOW_UPDATE, 0, 0, UINT32.pack(self.CONNECTION_WINDOW - DEFAULT_WINDOW))
        return out

    # ------------------------------------------------------------------ sending
    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _send_headers(self, stream_id: int, block: bytes, end_stream: bool = False) -> None:
        flags = END_STREAM if end_stream else 0
        max_frame = self._peer_max_frame
        if len(block) <= max_frame:
            self._out.append(frame(HEADERS, flags | END_HEADERS, stream_id, block))
            return
        self._out.append(frame(HEADERS, flags, stream_id, block[:max_frame]))
        rest = block[max_frame:]
        while rest:
            chunk, rest = rest[:max_frame], rest[max_frame:]
            self._out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk))

    def _send_body(self, stream_id: int, stream: _Stream, head: bytes, body: bytes, end_after: bytes | None) -> None:
        """Queue `head` + `body` as DATA (END_STREAM on the last frame when `end_after` is None,
        else the trailers `end_after` after it); the body is sent from views, never copied whole."""
        stream.head = head
        stream.pending = memoryview(body)
        stream.end_after = end_after
        if not self._drain(stream_id, stream):
            self._blocked.append(stream_id)

    def _drain(self, stream_id: int, stream: _Stream) -> bool:
        """Send what the windows allow; True when the body (and trailers) are out."""
        head, pending, trailers = stream.head, stream.pending, stream.end_after
        while head or pending:
            size = min(len(head) + len(pending), stream.window, self._send_window, self._peer_max_frame)
            if size <= 0:
                stream.head, stream.pending = head, pending
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
        stream.head, stream.pending = head, pending
        if trailers is not None:
            stream.end_after = None
            self._send_headers(stream_id, trailers, end_stream=True)
        self._sent(stream_id)
        return True

    def _sent(self, stream_id: int) -> None:
        """The whole body of a stream is out (hook)."""

    def _flush_blocked(self) -> None:
        for _ in range(len(self._blocked)):
            stream_id = self._blocked.popleft()
            stream = self.streams.get(stream_id)
            if stream is not None and (stream.head or stream.pending or stream.end_after is not None):
                if not self._drain(stream_id, stream):
                    self._blocked.append(stream_id)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Forget a stream and tell the peer."""
        if self.streams.pop(stream_id, None) is not None and not self.closed:
            self._out.append(frame(RST_STREAM, 0, stream_id, UINT32.pack(error_code)))

    def ping(self, opaque: bytes) -> None:
        self._out.append(frame(PING, 0, 0, opaque[:8].ljust(8, b"\0")))

    def goaway(self, last_stream_id: int, error_code: int = NO_ERROR) -> None:
        self._out.append(frame(GOAWAY, 0, 0, UINT32.pack(last_stream_id) + UINT32.pack(error_code)))

    # ------------------------------------------------------------------ receiving
    def receive(self, data: bytes) -> list:
        """Parse what arrived; the events it completes. A protocol error sends GOAWAY, closes the
        connection and ends with the events of `connection_lost`.

        Frames are read in place (through a memoryview of `data`, or of the carried-over partial
        frame plus `data`) and DATA payloads are copied once, into their stream's body: a 500 MB
        insert passes through here."""
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
                while available - position >= 9:
                    length = int.from_bytes(view[position : position + 3], "big")
                    if length > MAX_ACCEPTED_FRAME:
                        raise ProtocolError(f"frame of {length} bytes")
                    end = position + 9 + length
                    if end > available:
                        break
                    kind = view[position + 3]
                    flags = view[position + 4]
                    stream_id = UINT32.unpack_from(view, position + 5)[0] & MAX_STREAM_ID
                    if self._header_stream and kind != CONTINUATION:
                        raise ProtocolError("header block interrupted")
                    if kind == DATA:
                        with view[position + 9 : end] as payload:
                            self._frame(kind, flags, stream_id, payload, events)
                    else:
                        self._frame(kind, flags, stream_id, bytes(view[position + 9 : end]), events)
                    position = end
        except (ProtocolError, HPACKError, struct.error, ValueError) as exc:
            buffer.clear()
            if not self.closed:
                self.goaway(0, COMPRESSION_ERROR if isinstance(exc, HPACKError) else PROTOCOL_ERROR)
            events.extend(self.connection_lost(f"HTTP/2 protocol error: {exc}"))
            return events
        if source is buffer:
            del buffer[:position]
        elif position < len(data):
            buffer += data[position:]  # a partial frame waits for the rest
        return events

    def _preface(self, buffer: bytearray) -> int:
        """Bytes to skip before the first frame (the server checks the client preface here)."""
        return 0

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if kind == DATA:
            if not stream_id:
                raise ProtocolError("DATA on stream 0")
            self._grant(stream_id, len(payload))
            stream = self.streams.get(stream_id)
            if stream is not None:  # else a stream we reset: its bytes still counted above
                self._data(stream_id, stream, self._unpad(flags, payload), bool(flags & END_STREAM), events)
        elif kind == HEADERS:
            if not stream_id:
                raise ProtocolError("HEADERS on stream 0")
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._header_block = bytearray(payload)
            self._header_end_stream = bool(flags & END_STREAM)
            if flags & END_HEADERS:
                self._header_block_done(stream_id, events)
            else:
                self._header_stream = stream_id
        elif kind == CONTINUATION:
            if stream_id != self._header_stream or not stream_id:
                raise ProtocolError("unexpected CONTINUATION")
            self._header_block += payload
            if len(self._header_block) > 1 << 20:
                raise ProtocolError("header block over 1 MiB")
            if flags & END_HEADERS:
                self._header_stream = 0
                self._header_block_done(stream_id, events)
        elif kind == SETTINGS:
            if stream_id:
                raise ProtocolError("SETTINGS on a stream")
            if not flags & ACK:
                self._settings(payload)
                # the ACK goes out before any DATA the new windows allow: peers enforce a setting
                # from the moment it is acknowledged
                self._out.append(frame(SETTINGS, ACK, 0))
                self._settings_applied()
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolError("WINDOW_UPDATE length")
            increment = UINT32.unpack(payload)[0] & MAX_WINDOW
            if stream_id == 0:
                self._send_window += increment
                if self._send_window > MAX_WINDOW:
                    raise ProtocolError("connection window overflow")
            elif stream_id in self.streams:
                self.streams[stream_id].window += increment
            self._flush_blocked()
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise ProtocolError("bad PING")
            if flags & ACK:
                self._ping_acked(payload, events)
            else:
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or not stream_id:
                raise ProtocolError("bad RST_STREAM")
            if self.streams.pop(stream_id, None) is not None:
                self._reset_by_peer(stream_id, UINT32.unpack(payload)[0], events)
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise ProtocolError("GOAWAY length")
            last_id = UINT32.unpack(payload[:4])[0] & MAX_STREAM_ID
            self._goaway_received(last_id, UINT32.unpack(payload[4:8])[0], events)
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    def _grant(self, stream_id: int, size: int) -> None:
        """Give received DATA back to the peer's windows once half of a window is used up."""
        self._unacked += size
        if self._unacked >= self.CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, UINT32.pack(self._unacked)))
            self._unacked = 0
        stream = self.streams.get(stream_id)
        if stream is not None and self.STREAM_WINDOW < MAX_WINDOW:
            stream.received += size
            if stream.received >= self.STREAM_WINDOW // 2:
                self._out.append(frame(WINDOW_UPDATE, 0, stream_id, UINT32.pack(stream.received)))
                stream.received = 0

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ProtocolError("bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS length")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window too large")
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_ACCEPTED_FRAME:
                    raise ProtocolError("MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif key == MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value

    def _settings_applied(self) -> None:
        """After the ACK: send what the new settings allow."""
        self._flush_blocked()

    def _header_block_done(self, stream_id: int, events: list) -> None:
        block = bytes(self._header_block)
        self._header_block = bytearray()
        if block and min(block) >= 0x80:
            # Only one-byte "indexed field" representations: they cannot change the dynamic table,
            # so the same bytes decode the same way until a block with literals arrives. Replies
            # from gRPC servers are such blocks after the first one.
            headers = self._indexed_blocks.get(block)
            if headers is None:
                headers = self._decoder.decode(block, raw=True)
                if len(self._indexed_blocks) < 64:
                    self._indexed_blocks[block] = headers
        else:
            headers = self._decoder.decode(block, raw=True)  # always decoded: keeps the HPACK state
            if self._indexed_blocks:
                self._indexed_blocks.clear()
        self._headers(stream_id, headers, self._header_end_stream, events)

    # ------------------------------------------------------------------ subclass hooks
    def _headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool, events: list) -> None:
        raise NotImplementedError

    def _data(self, stream_id: int, stream: _Stream, data: bytes, end_stream: bool, events: list) -> None:
        raise NotImplementedError

    def _reset_by_peer(self, stream_id: int, error_code: int, events: list) -> None:
        raise NotImplementedError

    def _goaway_received(self, last_stream_id: int, error_code: int, events: list) -> None:
        raise NotImplementedError

    def _ping_acked(self, opaque: bytes, events: list) -> None:
        pass

    def connection_lost(self, reason: str) -> list:
        """The socket is gone (or the peer broke the protocol); the events that ends."""
        self.closed = True
        return []

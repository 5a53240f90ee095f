"""The front door's limits in the pure state machine, with a fake clock: what one peer may cost.

Each test drives `ServerConnection` with hand-built frames and checks both the answer (RFC 9113 or
docs/front-door.md) and the cost: how many streams a frame made us look at, how many bytes we keep.
End-to-end checks over real sockets are in tests/conformance/."""

from __future__ import annotations

import struct

from hpack import Decoder, Encoder

from mishards.protocol import grpc_h2 as g
from mishards.protocol import http2 as h

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/s/M"), ("content-type", "application/grpc")]


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        out.append(
            (
                data[pos + 3],
                data[pos + 4],
                struct.unpack(">I", data[pos + 5 : pos + 9])[0],
                data[pos + 9 : pos + 9 + length],
            )
        )
        pos += 9 + length
    return out


class CountingServer(g.ServerConnection):
    """Counts the streams the send side looks at."""

    drains = 0

    def _drain(self, stream_id, stream):
        self.drains += 1
        return super()._drain(stream_id, stream)


def server(now: float = 0.0, pool: h.BufferPool | None = None, **limits) -> CountingServer:
    connection = CountingServer(h.Limits(**limits), pool, now=now)
    connection.receive(h.PREFACE + h.frame(h.SETTINGS, 0, 0), now)
    connection.data_to_send()
    return connection


def open_requests(connection: g.ServerConnection, ids, end_stream: bool = True, body: bytes = b"q", now=0.0) -> list:
    encoder, data = Encoder(), b""
    for stream_id in ids:
        data += h.frame(h.HEADERS, h.END_HEADERS, stream_id, encoder.encode(REQUEST))
        if end_stream:
            data += h.frame(h.DATA, h.END_STREAM, stream_id, g.frame_message(body))
    return connection.receive(data, now)


def goaway_code(connection: g.ServerConnection) -> tuple[int, bytes] | None:
    for kind, _, _, payload in frames(connection.data_to_send()):
        if kind == h.GOAWAY:
            return struct.unpack(">I", payload[4:8])[0], payload[8:]
    return None


def test_window_update_flood_looks_only_at_streams_it_unblocks() -> None:
    """1,000 replies wait for window; 1,000 one-byte connection WINDOW_UPDATEs cost 1,000 stream
    visits, not a million; stream-window-blocked streams are not visited at all."""
    connection = server()
    connection.receive(h.frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.INITIAL_WINDOW_SIZE, 0)), 0)
    ids = list(range(1, 2001, 2))
    open_requests(connection, ids)
    for stream_id in ids:
        connection.send_reply(stream_id, b"r" * 100)
    connection.data_to_send()
    connection.drains = 0
    connection.receive(b"".join(h.frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) for _ in range(1000)), 1)
    assert connection.drains == 0  # every stream waits for its own window
    connection.receive(h.frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.INITIAL_WINDOW_SIZE, 1 << 20)), 1)
    connection.data_to_send()
    connection.drains = 0
    # the connection window is used up now; each one-byte grant moves one stream by one byte
    connection.receive(b"".join(h.frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) for _ in range(1000)), 2)
    assert connection.drains <= 1000
    assert not connection.closed


def test_settings_with_many_window_entries_apply_once() -> None:
    connection = server()
    open_requests(connection, range(1, 201, 2), end_stream=False)
    entries = b"".join(struct.pack(">HI", h.INITIAL_WINDOW_SIZE, value) for value in range(100, 5100))
    connection.receive(h.frame(h.SETTINGS, 0, 0, entries), 0)
    assert not connection.closed
    assert {stream.window for stream in connection.streams.values()} == {5099}
    # such a frame costs a token per 64 entries: the next one exhausts the SETTINGS budget (100)
    connection.receive(h.frame(h.SETTINGS, 0, 0, entries), 0)
    assert connection.closed and goaway_code(connection) == (h.ENHANCE_YOUR_CALM, b"too_many_settings")


def test_budgets_end_the_connection_with_enhance_your_calm() -> None:
    for kind, flags, payload, limit, debug in [
        (h.PING, 0, b"12345678", "max_pings", b"too_many_pings"),
        (h.SETTINGS, 0, b"", "max_settings", b"too_many_settings"),
        (h.PRIORITY, 0, struct.pack(">IB", 0, 1), "max_empty_frames", b"too_many_empty_frames"),
        (0x42, 0, b"unknown", "max_empty_frames", b"too_many_empty_frames"),
    ]:
        connection = server(**{limit: 10})
        stream = 1 if kind == h.PRIORITY else 0
        allowed = 9 if kind == h.SETTINGS else 10  # the handshake's SETTINGS counts
        connection.receive(h.frame(kind, flags, stream, payload) * allowed, 0.0)
        assert not connection.closed, limit
        connection.receive(h.frame(kind, flags, stream, payload), 0.0)
        assert connection.closed and goaway_code(connection) == (h.ENHANCE_YOUR_CALM, debug), limit


def test_budgets_refill_over_the_window() -> None:
    connection = server(max_pings=10, abuse_window=10.0)
    for second in range(100):  # one PING a second: within a budget of 10 per 10 s
        connection.receive(h.frame(h.PING, 0, 0, b"12345678"), float(second))
    assert not connection.closed


def test_rapid_reset_runs_out_of_its_budget() -> None:
    connection = server(max_resets=50)
    encoder = Encoder()
    data = b""
    for stream_id in range(1, 203, 2):
        data += h.frame(h.HEADERS, h.END_HEADERS, stream_id, encoder.encode(REQUEST))
        data += h.frame(h.DATA, h.END_STREAM, stream_id, g.frame_message(b"q"))
        data += h.frame(h.RST_STREAM, 0, stream_id, struct.pack(">I", h.CANCEL))
    events = connection.receive(data, 0)
    assert connection.closed and goaway_code(connection) == (h.ENHANCE_YOUR_CALM, b"too_many_resets")
    received = [e.stream_id for e in events if type(e) is g.RequestReceived]
    assert len(received) <= 51  # nothing after the budget ran out reaches a handler


def test_reset_streams_count_until_their_handler_ended() -> None:
    connection = server(max_concurrent_streams=2)
    received = open_requests(connection, [1, 3])
    assert [event.stream_id for event in received] == [1, 3]
    connection.receive(h.frame(h.RST_STREAM, 0, 1, struct.pack(">I", h.CANCEL)), 0)
    assert open_requests(connection, [5]) == []  # stream 1's handler still runs: refused
    assert (h.RST_STREAM, 5, struct.pack(">I", h.REFUSED_STREAM)) in [
        (k, s, p) for k, _, s, p in frames(connection.data_to_send())
    ]
    connection.handler_done(1)
    assert [event.stream_id for event in open_requests(connection, [7])] == [7]


def test_unfinished_bodies_are_bounded_per_connection() -> None:
    """16 requests each announcing 64 MiB and never finishing: what we keep stays near the
    connection's cap (plus its oldest request), because credit stops; the peer must then wait."""
    cap = 4 * 1024 * 1024
    pool = h.BufferPool(1 << 40)
    connection = server(pool=pool, connection_buffer=cap)
    ids = list(range(1, 33, 2))
    open_requests(connection, ids, end_stream=False)
    chunk = b"x" * (64 * 1024)
    sent = 0
    for _ in range(800):  # a peer sending as fast as its windows allow
        progressed = False
        for stream_id in ids:
            stream = connection.streams[stream_id]
            size = min(len(chunk), stream.recv_window, connection._recv_window)
            if size <= 0:
                continue
            connection.receive(h.frame(h.DATA, 0, stream_id, chunk[:size]), 0)
            sent += size
            progressed = True
        connection.data_to_send()
        if not progressed:
            break
    oldest = connection.streams[1].kept
    assert pool.used == connection._buffered == sum(s.kept for s in connection.streams.values())
    # beyond the cap, at most what the connection window had left when credit stopped
    assert pool.used - oldest <= cap + g.ServerConnection.CONNECTION_WINDOW
    assert sent < 16 * 64 * 1024 * 1024 and pool.used < 3 * cap + g.ServerConnection.CONNECTION_WINDOW
    assert not connection.closed


def test_request_over_the_message_limit_is_answered_and_its_bytes_released() -> None:
    pool = h.BufferPool()
    connection = server(pool=pool, max_message_size=1000)
    open_requests(connection, [1, 3], end_stream=False)
    # announced in the prefix: answered before the body arrives, nothing kept
    connection.receive(h.frame(h.DATA, 0, 1, g.message_prefix(b"x" * 5000) + b"x" * 100), 0)
    assert pool.used == 0
    # a prefix that understates it: answered once the body passes the limit, its bytes released
    connection.receive(h.frame(h.DATA, 0, 3, g.message_prefix(b"x" * 900) + b"x" * 900), 0)
    assert pool.used == 905
    connection.receive(h.frame(h.DATA, 0, 3, b"x" * 200), 0)
    assert pool.used == 0
    trailers = [f for f in frames(connection.data_to_send()) if f[0] == h.HEADERS]
    assert [f[2] for f in trailers] == [1, 3] and all(b"H2_MAX_MESSAGE_SIZE" in f[3] for f in trailers)
    connection.receive(h.frame(h.DATA, h.END_STREAM, 1, b"x" * 4900), 0)  # the rest is dropped
    connection.receive(h.frame(h.DATA, h.END_STREAM, 3, b"x" * 10), 0)
    assert not connection.streams and not connection.closed


def test_frames_above_our_max_frame_size_are_refused_from_their_header() -> None:
    connection = server()
    header = (g.ServerConnection.MAX_FRAME + 1).to_bytes(3, "big") + bytes((h.DATA, 0)) + struct.pack(">I", 1)
    connection.receive(header, 0)  # no payload yet: refused all the same
    assert connection.closed and goaway_code(connection)[0] == h.FRAME_SIZE_ERROR


def test_continuation_runs_are_bounded() -> None:
    connection = server(max_continuations=8)
    block = Encoder().encode(REQUEST)
    data = h.frame(h.HEADERS, 0, 1, block[:1]) + h.frame(h.CONTINUATION, 0, 1, b"") * 9
    connection.receive(data, 0)
    assert connection.closed and goaway_code(connection)[0] == h.ENHANCE_YOUR_CALM


def test_oversized_headers_are_answered_on_the_stream_without_echo() -> None:
    connection = server(max_header_list_size=4096)
    secret = "s" * 70_000
    block = Encoder().encode(REQUEST + [("x-big", secret)])
    pieces = [block[i : i + 16_384] for i in range(0, len(block), 16_384)]
    data = h.frame(h.HEADERS, 0, 1, pieces[0])
    for index, piece in enumerate(pieces[1:], 1):
        data += h.frame(h.CONTINUATION, h.END_HEADERS if index == len(pieces) - 1 else 0, 1, piece)
    assert connection.receive(data + h.frame(h.DATA, h.END_STREAM, 1, g.frame_message(b"q")), 0) == []
    out = connection.data_to_send()
    assert not connection.closed and b"sss" not in out
    (trailers,) = [f for f in frames(out) if f[0] == h.HEADERS]
    fields = dict(Decoder().decode(trailers[3], raw=True))
    assert fields[b"grpc-status"] == b"8" and b"H2_MAX_HEADER_LIST_SIZE" in fields[b"grpc-message"]
    assert [e.stream_id for e in open_requests(connection, [3])] == [3]  # the connection goes on


def test_read_timeout_resets_a_stalled_request_and_frees_it() -> None:
    pool = h.BufferPool()
    connection = server(pool=pool, read_timeout=30)
    open_requests(connection, [1, 3], end_stream=False, now=0)
    connection.receive(h.frame(h.DATA, 0, 1, g.message_prefix(b"x" * 1000) + b"x" * 95), 10)
    connection.receive(h.frame(h.DATA, 0, 3, g.message_prefix(b"x" * 1000) + b"x" * 95), 25)
    assert connection.expire(39) == []
    assert connection.expire(41) == [g.RequestCancelled(1)]
    assert pool.used == 100 and list(connection.streams) == [3]
    assert connection.expire(56) == [g.RequestCancelled(3)]
    assert pool.used == 0 and not connection.closed
    resets = [(s, p) for k, _, s, p in frames(connection.data_to_send()) if k == h.RST_STREAM]
    assert resets == [(1, struct.pack(">I", h.CANCEL)), (3, struct.pack(">I", h.CANCEL))]


def test_handshake_and_idle_timeouts() -> None:
    silent = g.ServerConnection(h.Limits(handshake_timeout=10), now=0)
    assert silent.expire(9) == [] and not silent.closed
    silent.expire(11)
    assert silent.closed
    idle = server(idle_timeout=300)
    open_requests(idle, [1])
    idle.send_reply(1, b"r")
    idle.handler_done(1)
    assert idle.expire(299) == [] and not idle.closed
    idle.expire(301)
    assert idle.closed and goaway_code(idle) == (h.NO_ERROR, b"idle")


def test_partial_frame_left_hanging_ends_the_connection() -> None:
    connection = server(read_timeout=30)
    connection.receive(h.frame(h.PING, 0, 0, b"12345678")[:12], 5)
    connection.expire(34)
    assert not connection.closed
    connection.expire(36)
    assert connection.closed


def test_stalled_requests_expire_when_the_process_is_over_its_buffer_cap() -> None:
    """Requests that wait for credit never expire while room may come back; when the whole process
    is over its cap, they do, so that connections waiting on each other cannot wait for ever."""
    pool = h.BufferPool(cap=1000)
    connection = server(pool=pool, read_timeout=30)
    open_requests(connection, [1], end_stream=False)
    connection.receive(h.frame(h.DATA, 0, 1, g.message_prefix(b"x" * 5000) + b"x" * 895), 0)
    assert connection.expire(40) == [g.RequestCancelled(1)]  # could send, did not
    open_requests(connection, [3], end_stream=False, now=40)
    body = g.message_prefix(b"x" * 10_000_000) + b"x" * 60_000
    connection.receive(h.frame(h.DATA, 0, 3, body) * 40, 40)  # over the cap: no credit
    assert connection.streams[3].starved
    pool.cap = 1 << 30
    assert connection.expire(100) == []  # it waits for us: not its fault
    pool.cap = 1000
    assert connection.expire(131) == [g.RequestCancelled(3)]
    assert pool.used == 0


def test_inflate_stops_a_bomb_at_the_limit() -> None:
    import gzip
    import zlib

    import pytest

    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # 64 MiB from ~64 KB
    with pytest.raises(g.MessageTooLarge, match="H2_MAX_MESSAGE_SIZE"):
        g.inflate(bomb, b"gzip", 1 << 20)
    assert g.inflate(bomb, b"gzip", 64 << 20) == b"\0" * (64 << 20)
    assert g.inflate(zlib.compress(b"abc" * 1000), b"deflate", 3000) == b"abc" * 1000
    with pytest.raises(g.BadMessage, match="truncated"):
        g.inflate(gzip.compress(b"hello" * 100)[:-12], b"gzip", 10_000)
    with pytest.raises(g.BadMessage, match="bad gzip data"):
        g.inflate(b"not gzip at all", b"gzip", 10_000)


def test_a_bomb_under_a_large_limit_is_refused_having_held_little() -> None:
    """A bomb inflating past the limit is measured before it is kept: refused at a 64 MiB limit
    with a few MiB allocated at the peak, where keeping it would have held the whole limit."""
    import gzip
    import tracemalloc

    import pytest

    bomb = gzip.compress(b"\0" * (96 << 20), 9)
    tracemalloc.start()
    try:
        with pytest.raises(g.MessageTooLarge):
            g.inflate(bomb, b"gzip", 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"{peak / 2**20:.0f} MiB held"

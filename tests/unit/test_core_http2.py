"""The sans-IO HTTP/2 + gRPC connections: a client and a server pumped into each other, and
hand-built frames for what our own peer never sends (HPACK with indexing and Huffman, padding,
priority, CONTINUATION from the server, protocol errors). Real grpcio interop is in
test_transport_interop.py."""

from __future__ import annotations

import gzip
import struct

import pytest
from hpack import Decoder, Encoder
from hpack.hpack import decode_integer
from hypothesis import given
from hypothesis import strategies as st

from mishards.protocol import grpc_h2 as g
from mishards.protocol import http2 as h


def pump(client: g.ClientConnection, server: g.ServerConnection, rounds: int = 200) -> tuple[list, list]:
    """Move bytes both ways until both sides are quiet; the events each side produced."""
    client_events, server_events = [], []
    for _ in range(rounds):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        if to_server:
            server_events += server.receive(to_server)
        if to_client:
            client_events += client.receive(to_client)
    raise AssertionError("connections never went quiet")


def pair(server_attrs: dict | None = None, **limits) -> tuple[g.ClientConnection, g.ServerConnection]:
    server_class = type("TestServer", (g.ServerConnection,), server_attrs) if server_attrs else g.ServerConnection
    client, server = g.ClientConnection("node:19530"), server_class(h.Limits(**limits))
    pump(client, server)
    return client, server


def answered(server: g.ServerConnection) -> list[tuple[int, int]]:
    """(stream, grpc-status) of each trailers-only answer the server queued."""
    out = []
    for kind, flags, stream, payload in frames(server.data_to_send()):
        if kind == h.HEADERS and flags & h.END_STREAM:
            status = dict(Decoder().decode(payload, raw=True)).get(b"grpc-status")
            out.append((stream, int(status)))
    return out


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = struct.unpack(">I", data[pos + 5 : pos + 9])[0]
        out.append((kind, flags, stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def test_unary_round_trip_with_timeout_and_metadata() -> None:
    client, server = pair()
    stream = client.start_call(
        b"/milvus.grpc.MilvusService/Search", b"query", 2.5, (("x-trace", "t1"), ("k-bin", b"\x00\xff"))
    )
    _, received = pump(client, server)
    (request,) = received
    assert request == g.RequestReceived(
        stream, "/milvus.grpc.MilvusService/Search", b"query", pytest.approx(2.5, rel=1e-6), request.metadata
    )
    assert ("x-trace", "t1") in request.metadata
    server.send_reply(stream, b"answer")
    answers, _ = pump(client, server)
    assert answers == [g.CallDone(stream, b"answer")]
    assert not client.streams and not server.streams  # nothing left behind


@pytest.mark.parametrize("size", [0, 1, 70_000, 5 * 1024 * 1024 + 3])
def test_large_messages_flow_through_small_windows(size: int) -> None:
    """The server grants only 65535-byte windows: both directions must wait for WINDOW_UPDATEs."""
    client, server = pair({"STREAM_WINDOW": 65_535, "CONNECTION_WINDOW": 65_535})
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    stream = client.start_call(b"/s/M", payload, None)
    _, received = pump(client, server, rounds=5000)
    assert [r.message for r in received] == [payload]
    server.send_reply(stream, payload[::-1])
    answers, _ = pump(client, server, rounds=5000)
    assert answers == [g.CallDone(stream, payload[::-1])]


def test_many_concurrent_calls_complete_out_of_order() -> None:
    client, server = pair()
    ids = [client.start_call(b"/s/M", str(i).encode(), 1.0) for i in range(50)]
    _, received = pump(client, server)
    assert [r.message for r in received] == [str(i).encode() for i in range(50)]
    for request in reversed(received):
        server.send_reply(request.stream_id, request.message * 2)
    answers, _ = pump(client, server)
    assert {a.stream_id: a.message for a in answers} == {i: str(n).encode() * 2 for n, i in enumerate(ids)}


@pytest.mark.parametrize("details", ["", "collection not found", "100% ünïcödé, \n and %41"])
def test_error_status_travels_as_trailers_only(details: str) -> None:
    client, server = pair()
    stream = client.start_call(b"/s/M", b"q", None)
    pump(client, server)
    server.send_status(stream, g.UNIMPLEMENTED, details)
    answers, _ = pump(client, server)
    assert answers == [g.CallFailed(stream, g.UNIMPLEMENTED, details)]


def test_header_block_larger_than_a_frame_uses_continuation() -> None:
    client, server = pair({"MAX_FRAME": h.DEFAULT_MAX_FRAME}, max_header_list_size=64_000)
    big = "v" * 40_000
    stream = client.start_call(b"/s/M", b"q", None, (("x-big", big),))
    sent = client.data_to_send()
    kinds = [f[0] for f in frames(sent)]
    assert kinds[:3] == [h.HEADERS, h.CONTINUATION, h.CONTINUATION]
    (request,) = server.receive(sent)
    assert request.stream_id == stream and ("x-big", big) in request.metadata


def test_client_cancel_resets_the_stream_on_the_server() -> None:
    client, server = pair()
    stream = client.start_call(b"/s/M", b"q", 1.0)
    pump(client, server)
    client.cancel(stream)
    _, events = pump(client, server)
    assert events == [g.RequestCancelled(stream)]
    server.send_reply(stream, b"late")  # answered after the cancel: dropped, no error
    answers, _ = pump(client, server)
    assert answers == []


def test_goaway_fails_only_calls_the_server_never_saw() -> None:
    client, server = pair()
    seen = client.start_call(b"/s/M", b"a", None)
    pump(client, server)
    server.shutdown()
    unseen = client.start_call(b"/s/M", b"b", None)  # crosses the GOAWAY on the wire
    answers, received = pump(client, server)
    assert answers == [g.CallFailed(unseen, g.UNAVAILABLE, answers[0].details)]
    assert "GOAWAY" in answers[0].details
    assert not client.usable and received == []  # the server refused the late stream
    server.send_reply(seen, b"done")  # what it had accepted is still answered
    answers, _ = pump(client, server)
    assert answers == [g.CallDone(seen, b"done")]


def test_calls_wait_for_the_servers_stream_limit() -> None:
    client, server = pair(max_concurrent_streams=2)
    ids = [client.start_call(b"/s/M", bytes([i]), None) for i in range(3)]
    _, received = pump(client, server)
    assert [r.stream_id for r in received] == ids[:2]
    server.send_reply(ids[0], b"0")
    answers, received = pump(client, server)
    assert answers == [g.CallDone(ids[0], b"0")] and [r.stream_id for r in received] == [ids[2]]


def test_cancelled_queued_call_never_reaches_the_server() -> None:
    client, server = pair(max_concurrent_streams=1)
    first, queued = client.start_call(b"/s/M", b"1", None), client.start_call(b"/s/M", b"2", None)
    pump(client, server)
    client.cancel(queued)
    server.send_reply(first, b"r")
    answers, received = pump(client, server)
    assert answers == [g.CallDone(first, b"r")] and received == []


def test_ping_is_acknowledged() -> None:
    client, server = pair()
    client.ping(b"12345678")
    answers, _ = pump(client, server)
    assert answers == [g.PingAcked(b"12345678")]


def test_connection_lost_fails_every_open_call_as_unavailable() -> None:
    client, server = pair()
    ids = [client.start_call(b"/s/M", b"q", None) for _ in range(3)]
    failed = client.connection_lost("connection reset")
    assert failed == [g.CallFailed(i, g.UNAVAILABLE, "connection reset") for i in ids]
    assert not client.usable


def test_reply_over_the_receive_limit_is_refused() -> None:
    client = g.ClientConnection("n:1", max_receive=1000)
    server = g.ServerConnection()
    pump(client, server)
    stream = client.start_call(b"/s/M", b"q", None)
    pump(client, server)
    server.send_reply(stream, b"x" * 5000)
    answers, _ = pump(client, server)
    assert [(a.stream_id, a.code) for a in answers] == [(stream, g.RESOURCE_EXHAUSTED)]


def test_request_over_the_receive_limit_is_refused() -> None:
    client, server = pair(max_message_size=1000)
    stream = client.start_call(b"/s/M", b"x" * 5000, None)
    answers, received = pump(client, server)
    assert received == []
    assert [(a.stream_id, a.code) for a in answers] == [(stream, g.RESOURCE_EXHAUSTED)]
    assert "H2_MAX_MESSAGE_SIZE" in answers[0].details
    assert not server.streams


def test_not_http2_closes_the_connection() -> None:
    server = g.ServerConnection()
    server.data_to_send()
    assert server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []
    assert server.closed
    assert frames(server.data_to_send())[0][0] == h.GOAWAY


def test_preface_may_arrive_in_pieces() -> None:
    client, server = g.ClientConnection("n:1"), g.ServerConnection()
    data = client.data_to_send()
    for i in range(len(data)):
        assert server.receive(data[i : i + 1]) == []
    assert not server.closed


def test_request_checks() -> None:
    """What a gRPC server rejects before calling a handler, and with which code."""
    client, server = pair()
    encoder = Encoder()
    streams = iter(range(3, 1000, 2))

    def request(headers, body=b"\x00\x00\x00\x00\x01q"):
        """The RequestReceived, or the grpc-status the server answered at once."""
        stream = next(streams)
        block = encoder.encode(headers)
        data = h.frame(h.HEADERS, h.END_HEADERS, stream, block) + h.frame(h.DATA, h.END_STREAM, stream, body)
        events = server.receive(data)
        if events:
            return events[0]
        ((answered_stream, code),) = answered(server)
        assert answered_stream == stream
        return code

    ok = [(":method", "POST"), (":scheme", "http"), (":path", "/s/M"), ("content-type", "application/grpc")]
    assert type(request(ok)) is g.RequestReceived
    assert request([(":method", "GET")] + ok[1:]) == g.UNIMPLEMENTED
    assert request(ok[:3] + [("content-type", "text/html")]) == g.INTERNAL
    assert request(ok + [("grpc-encoding", "br")]) == g.UNIMPLEMENTED
    gzipped = gzip.compress(b"hello")
    received = request(ok + [("grpc-encoding", "gzip")], body=b"\x01" + len(gzipped).to_bytes(4, "big") + gzipped)
    assert received.encoding == b"gzip" and g.inflate(received.message, b"gzip", 100) == b"hello"
    assert request(ok, body=b"\x01\x00\x00\x00\x01q") == g.INTERNAL  # compressed, no grpc-encoding
    assert request(ok, body=b"\x00\x00\x00\x00\x05q") == g.INTERNAL  # length does not match
    assert request(ok + [("grpc-timeout", "soon")]) == g.INTERNAL
    assert not server.closed


def server_reply(stream: int, encoder: Encoder, headers, body: bytes | None, trailers=None, flags: int = 0) -> bytes:
    """What a real server sends: HPACK with indexing and Huffman (hpack's defaults)."""
    if body is None:
        return h.frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, stream, encoder.encode(headers))
    out = h.frame(h.HEADERS, h.END_HEADERS, stream, encoder.encode(headers))
    out += h.frame(h.DATA, flags, stream, body)
    return out + h.frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, stream, encoder.encode(trailers))


def fresh_client() -> tuple[g.ClientConnection, Encoder]:
    client = g.ClientConnection("n:1")
    client.receive(h.frame(h.SETTINGS, 0, 0))
    client.data_to_send()
    return client, Encoder()


def test_indexed_and_huffman_headers_from_a_real_encoder() -> None:
    client, encoder = fresh_client()
    ok = [(":status", "200"), ("content-type", "application/grpc")]
    for _ in range(3):  # the second and third replies reuse the dynamic table
        stream = client.start_call(b"/s/M", b"q", None)
        events = client.receive(server_reply(stream, encoder, ok, g.frame_message(b"r"), [("grpc-status", "0")]))
        assert events == [g.CallDone(stream, b"r")]


def test_indexed_block_memo_follows_the_dynamic_table() -> None:
    """The same all-indexed bytes mean another header once a literal has shifted the table."""
    client, _ = fresh_client()

    def status_of(block: bytes) -> g.CallFailed:
        stream = client.start_call(b"/s/M", b"q", None)
        (event,) = client.receive(h.frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, stream, block))
        return event

    add = lambda name, value: b"\x40" + h.hpack_string(name) + h.hpack_string(value)  # noqa: E731 - incremental indexing
    assert status_of(add(b"grpc-status", b"5") + b"\x88").code == 5  # table: [62] grpc-status: 5
    assert status_of(b"\x88\xbe").code == 5  # :status 200, [62]
    assert status_of(b"\x88\xbe").code == 5  # the memo
    assert status_of(add(b"grpc-status", b"7") + b"\x88").code == 7  # table: [62] grpc-status: 7, [63] ...: 5
    assert status_of(b"\x88\xbe").code == 7
    assert status_of(b"\x88\xbf").code == 5


def test_padding_priority_and_continuation_from_the_server() -> None:
    client, encoder = fresh_client()
    stream = client.start_call(b"/s/M", b"q", None)
    block = encoder.encode([(":status", "200"), ("content-type", "application/grpc"), ("x-long", "y" * 100)])
    padded = bytes([4]) + bytes(5) + block[:20] + bytes(4)  # pad length, priority fields, fragment, padding
    data = h.frame(h.HEADERS, h.PADDED | h.PRIORITY_FLAG, stream, padded)
    data += h.frame(h.CONTINUATION, h.END_HEADERS, stream, block[20:])
    body = g.frame_message(b"reply")
    data += h.frame(h.DATA, h.PADDED, stream, bytes([3]) + body + bytes(3))
    data += h.frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, stream, encoder.encode([("grpc-status", "0")]))
    assert client.receive(data) == [g.CallDone(stream, b"reply")]


@pytest.mark.parametrize(
    ("headers", "body", "trailers", "code"),
    [
        ([(":status", "503")], None, None, g.UNAVAILABLE),
        ([(":status", "404")], None, None, g.UNIMPLEMENTED),
        ([(":status", "200"), ("grpc-status", "5"), ("grpc-message", "not%20found")], None, None, 5),
        ([(":status", "200")], g.frame_message(b"r"), [("x", "no status")], g.INTERNAL),
        ([(":status", "200")], b"\x01\x00\x00\x00\x01r", [("grpc-status", "0")], g.INTERNAL),
        ([(":status", "200")], b"", [("grpc-status", "0")], g.INTERNAL),
        (
            [(":status", "200"), ("grpc-encoding", "gzip")],
            b"\x01\x00\x00\x00\x02xx",
            [("grpc-status", "0")],
            g.INTERNAL,
        ),
    ],
)
def test_bad_replies_fail_with_a_code(headers, body, trailers, code) -> None:
    client, encoder = fresh_client()
    stream = client.start_call(b"/s/M", b"q", None)
    (event,) = client.receive(server_reply(stream, encoder, headers, body, trailers))
    assert type(event) is g.CallFailed and event.code == code and event.stream_id == stream


def test_gzip_replies_are_decompressed() -> None:
    client, encoder = fresh_client()
    stream = client.start_call(b"/s/M", b"q", None)
    body = gzip.compress(b"reply" * 100)
    headers = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-encoding", "gzip")]
    reply = b"\x01" + len(body).to_bytes(4, "big") + body
    assert client.receive(server_reply(stream, encoder, headers, reply, [("grpc-status", "0")])) == [
        g.CallDone(stream, b"reply" * 100)
    ]


def test_server_answering_early_resets_the_rest_of_the_request() -> None:
    """A reply that arrives while the request still waits for window ends the stream on both sides."""
    client, server = pair({"STREAM_WINDOW": 65_535, "CONNECTION_WINDOW": 65_535})
    stream = client.start_call(b"/s/M", b"x" * 200_000, None)
    server.receive(client.data_to_send())  # the first window's worth
    server.send_status(stream, g.RESOURCE_EXHAUSTED, "too big")
    answers, _ = pump(client, server)
    assert [(a.stream_id, a.code) for a in answers] == [(stream, g.RESOURCE_EXHAUSTED)]
    assert not client.streams and not server.streams


def test_rst_stream_from_the_server() -> None:
    client, _ = fresh_client()
    stream = client.start_call(b"/s/M", b"q", None)
    events = client.receive(h.frame(h.RST_STREAM, 0, stream, struct.pack(">I", h.REFUSED_STREAM)))
    assert [(e.stream_id, e.code) for e in events] == [(stream, g.UNAVAILABLE)]


@pytest.mark.parametrize(
    "garbage",
    [
        h.frame(h.CONTINUATION, h.END_HEADERS, 1, b"\x88"),  # no HEADERS before it
        h.frame(h.PUSH_PROMISE, 0, 1, bytes(8)),  # push was disabled
        h.frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),  # overflows the window
        h.frame(h.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"),  # initial window above 2^31-1
        h.frame(h.HEADERS, h.END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),  # HPACK index out of range
        h.frame(h.PING, 0, 0, b"short"),
        h.frame(h.HEADERS, 0, 1, b"\x88") + h.frame(h.DATA, 0, 1, b"x"),  # header block interrupted
    ],
)
def test_protocol_errors_close_the_connection_and_fail_its_calls(garbage: bytes) -> None:
    client, _ = fresh_client()
    stream = client.start_call(b"/s/M", b"q", None)
    client.data_to_send()
    events = client.receive(garbage)
    assert [(e.stream_id, e.code) for e in events] == [(stream, g.UNAVAILABLE)]
    assert client.closed and frames(client.data_to_send())[-1][0] == h.GOAWAY


def test_settings_change_the_windows_of_open_streams() -> None:
    client, _ = fresh_client()
    client.receive(h.frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.INITIAL_WINDOW_SIZE, 10)))
    client.data_to_send()
    stream = client.start_call(b"/s/M", b"x" * 100, None)
    sent = [f for f in frames(client.data_to_send()) if f[0] == h.DATA]
    assert sum(len(f[3]) for f in sent) == 10  # 105 bytes framed, 10 allowed
    client.receive(h.frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.INITIAL_WINDOW_SIZE, 1000)))
    sent = [f for f in frames(client.data_to_send()) if f[0] == h.DATA]
    assert sum(len(f[3]) for f in sent) == 95 and sent[-1][1] & h.END_STREAM and sent[-1][2] == stream


@given(st.integers(0, 2**32), st.integers(1, 8), st.integers(0, 255))
def test_hpack_integers_decode_with_the_reference_decoder(value: int, prefix: int, high_bits: int) -> None:
    first = high_bits & ~((1 << prefix) - 1) & 0xFF  # the bits above the prefix stay as given
    block = h.hpack_int(value, prefix, first)
    assert decode_integer(block, prefix) == (value, len(block))
    assert block[0] & ~((1 << prefix) - 1) & 0xFF == first


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_literals_decode_with_the_reference_decoder(name: bytes, value: bytes) -> None:
    """The form our requests use: literal without indexing, new or static-table name."""
    name = b"x-" + name.lower()
    assert Decoder().decode(h.literal(name, value), raw=True) == [(name, value)]
    assert Decoder().decode(h.literal_indexed_name(4, value), raw=True) == [(b":path", value)]


@given(st.floats(min_value=1e-6, max_value=1e7))
def test_timeouts_round_trip_within_a_unit(seconds: float) -> None:
    encoded = g.encode_timeout(seconds)
    assert len(encoded) <= 9
    decoded = g.decode_timeout(encoded)
    # truncated, never extended; 8 digits in the finest unit that fits lose at most 1e-5 of it
    assert seconds * (1 - 2e-5) - 1e-6 <= decoded <= seconds * (1 + 1e-9)


def test_tiny_windows_split_the_message_prefix_and_body() -> None:
    """Windows of a few bytes: the 5-byte prefix and the body go out in pieces, in order."""
    client, _ = fresh_client()
    client.receive(h.frame(h.SETTINGS, 0, 0, struct.pack(">HI", h.INITIAL_WINDOW_SIZE, 3)))
    client.data_to_send()
    stream = client.start_call(b"/s/M", b"0123456789", None)
    sent = b""
    for grant in [0, 1, 2, 4, 100]:
        if grant:
            client.receive(h.frame(h.WINDOW_UPDATE, 0, stream, struct.pack(">I", grant)))
        data_frames = [f for f in frames(client.data_to_send()) if f[0] == h.DATA]
        assert all(len(f[3]) <= max(grant, 3) for f in data_frames)
        sent += b"".join(f[3] for f in data_frames)
    assert sent == g.frame_message(b"0123456789")
    assert data_frames[-1][1] & h.END_STREAM


_names = st.binary(min_size=0, max_size=140)
_field = st.one_of(
    st.tuples(st.just("indexed"), st.integers(0, 130)),
    st.tuples(st.just("literal"), _names, _names),
    st.tuples(st.sampled_from(["literal_static_name", "never_indexed_static_name"]), st.integers(1, 70), _names),
    st.tuples(st.just("huffman"), _names, _names),
    st.tuples(st.just("incremental"), _names, _names),
)


def _encode_field(field) -> bytes:
    kind = field[0]
    if kind == "indexed":
        return h.hpack_int(field[1], 7, 0x80)
    if kind == "literal":
        return h.literal(field[1], field[2])
    if kind == "literal_static_name":
        return h.hpack_int(field[1], 4, 0x00) + h.hpack_string(field[2])
    if kind == "never_indexed_static_name":
        return h.hpack_int(field[1], 4, 0x10) + h.hpack_string(field[2])
    encoder = Encoder()
    return encoder.encode([(field[1] or b"x", field[2])], huffman=kind == "huffman")


@given(st.lists(_field, max_size=8), st.integers(0, 3), st.integers(200, 4000))
def test_the_plain_block_decoder_agrees_with_hpack_or_steps_aside(fields, cut, limit) -> None:
    """Whatever it decodes, hpack decodes the same (also cut short, also over the size limit);
    where it returns None the block may change the dynamic table, be malformed or too large."""
    block = b"".join(_encode_field(f) for f in fields)
    block = block[: len(block) - cut] if cut else block
    ours = h.decode_plain_block(block, limit)
    try:
        theirs = Decoder(max_header_list_size=limit).decode(block, raw=True)
    except Exception:  # noqa: BLE001 - hpack refuses it: ours must not have accepted it
        theirs = None
    if ours is not None:
        assert theirs is not None and [tuple(x) for x in theirs] == ours


def test_our_own_blocks_take_the_plain_path() -> None:
    """The blocks our client and server send decode without the full HPACK decoder."""
    for block in (g._REPLY_HEADERS, g._TRAILERS_OK, h.literal(b"grpc-status", b"5") + h.literal(b"grpc-message", b"x")):
        assert h.decode_plain_block(block, 16384) is not None
    client = g.ClientConnection("node:1")
    client.data_to_send()
    client.start_call(b"/milvus.grpc.MilvusService/Search", b"abc", 5.0, (("k", "v"),))
    wire = client.data_to_send()
    length = int.from_bytes(wire[:3], "big")
    assert wire[3] == h.HEADERS
    assert h.decode_plain_block(wire[9 : 9 + length], 16384) is not None

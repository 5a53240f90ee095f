"""Frame format and sizes, the stream-0 rules, padding, PING, GOAWAY, RST_STREAM, PRIORITY,
PUSH_PROMISE and unknown frames (RFC 9113 sections 4, 5.5, 6)."""

from __future__ import annotations

import pytest
from hyperframe.frame import PingFrame

from .harness import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    ECHO,
    END_HEADERS,
    END_STREAM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_FRAME_SIZE,
    PADDED,
    PING,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SLOW,
    UNKNOWN_TYPE,
    WINDOW_UPDATE,
    data,
    goaway,
    grpc_message,
    ping,
    priority,
    raw_frame,
    request_headers,
    rst_stream,
)


def max_frame(peer) -> int:
    return peer.server_settings.get(MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)


# ---------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("kind", "stream"),
    [(DATA, 1), (HEADERS, 1), (CONTINUATION, 1), (PING, 0), (SETTINGS, 0), (UNKNOWN_TYPE, 0), (WINDOW_UPDATE, 0)],
    ids=["DATA", "HEADERS", "CONTINUATION", "PING", "SETTINGS", "unknown", "WINDOW_UPDATE"],
)
def test_frame_over_max_frame_size_is_refused_from_its_header_alone(peer, kind: int, stream: int) -> None:
    """Only the 9-byte header is sent: the answer must not wait for a payload it will not read."""
    if kind in (DATA, CONTINUATION):  # an open stream (with a header block in progress for CONTINUATION)
        end_headers = kind == DATA
        peer.send(peer.headers_frame(1, request_headers(SLOW), end_headers=end_headers))
    peer.send(raw_frame(kind, 0, stream, length=max_frame(peer) + 1))
    peer.expect_goaway(FRAME_SIZE_ERROR)


def test_frame_of_exactly_max_frame_size_is_accepted(peer) -> None:
    size = max_frame(peer)
    body = grpc_message(b"y" * (size - 5))
    peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, body))
    assert peer.response(1).message == b"y" * (size - 5)


@pytest.mark.parametrize(
    ("kind", "flags", "stream", "length"),
    [
        (PING, 0, 0, 7),
        (PING, 0, 0, 9),
        (PING, ACK, 0, 0),
        (WINDOW_UPDATE, 0, 0, 3),
        (WINDOW_UPDATE, 0, 0, 5),
        (WINDOW_UPDATE, 0, 1, 3),
        (RST_STREAM, 0, 1, 3),
        (RST_STREAM, 0, 1, 5),
        (GOAWAY, 0, 0, 7),
        (GOAWAY, 0, 0, 0),
    ],
    ids=["PING-7", "PING-9", "PING-ACK-0", "WU0-3", "WU0-5", "WU1-3", "RST-3", "RST-5", "GOAWAY-7", "GOAWAY-0"],
)
def test_fixed_size_frames_of_the_wrong_size_are_frame_size_errors(peer, kind, flags, stream, length) -> None:
    if stream:  # an open stream: the size rule, not the idle-stream rule, is what answers
        peer.send(peer.request(1, SLOW, b"30"))
    peer.send(raw_frame(kind, flags, stream, b"\0" * length))
    peer.expect_goaway(FRAME_SIZE_ERROR)


@pytest.mark.parametrize("length", [4, 6])
def test_priority_of_the_wrong_size_is_a_stream_error(peer, length: int) -> None:
    peer.send(peer.request(1, SLOW, b"30"))
    peer.send(raw_frame(PRIORITY, 0, 1, b"\0" * length))
    peer.expect_rst(1, FRAME_SIZE_ERROR)


# ---------------------------------------------------------------------- stream 0 or not
@pytest.mark.parametrize(
    "frame",
    [
        data(0, b"x"),
        raw_frame(HEADERS, END_HEADERS | END_STREAM, 0, b"\x83\x86"),
        priority(0, 1),
        rst_stream(0),
        raw_frame(CONTINUATION, END_HEADERS, 0, b""),
    ],
    ids=["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "CONTINUATION"],
)
def test_stream_frames_on_stream_0_are_protocol_errors(peer, frame: bytes) -> None:
    peer.send(frame)
    peer.expect_goaway(PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "frame",
    [raw_frame(PING, 0, 1, b"12345678"), raw_frame(GOAWAY, 0, 1, b"\0" * 8)],
    ids=["PING", "GOAWAY"],
)
def test_connection_frames_on_a_stream_are_protocol_errors(peer, frame: bytes) -> None:
    peer.send(frame)
    peer.expect_goaway(PROTOCOL_ERROR)


def test_push_promise_from_a_client_is_a_protocol_error(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"))
    peer.send(raw_frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\x02" + peer.encode(request_headers())))
    peer.expect_goaway(PROTOCOL_ERROR)


# ---------------------------------------------------------------------- padding
def test_padded_data_is_served(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, grpc_message(b"padded"), pad=7))
    assert peer.response(1).message == b"padded"


def test_padded_headers_are_served(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO), pad=10), data(1, grpc_message(b"hp")))
    assert peer.response(1).message == b"hp"


@pytest.mark.parametrize("kind", [DATA, HEADERS], ids=["DATA", "HEADERS"])
@pytest.mark.parametrize("overshoot", [0, 1, 200], ids=lambda n: f"pad=len+{n}")
def test_padding_not_smaller_than_the_payload_is_a_protocol_error(peer, kind: int, overshoot: int) -> None:
    if kind == DATA:
        peer.send(peer.headers_frame(1, request_headers(SLOW)))
        body = b"abc"
        peer.send(raw_frame(DATA, PADDED, 1, bytes((len(body) + 1 + overshoot,)) + body))
    else:
        block = peer.encode(request_headers(SLOW))
        pad_length = min(len(block) + 1 + overshoot, 255)
        peer.send(raw_frame(HEADERS, PADDED | END_HEADERS, 1, bytes((pad_length,)) + block))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_padding_of_the_whole_payload_but_the_length_byte_is_accepted(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)))
    peer.send(raw_frame(DATA, PADDED, 1, bytes((4,)) + b"\0" * 4), data(1, grpc_message(b"z")))
    assert peer.response(1).message == b"z"


# ---------------------------------------------------------------------- PING
def test_ping_is_answered_with_the_same_payload(peer) -> None:
    peer.send(ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    answer = peer.read_until(lambda r: isinstance(r.frame, PingFrame)).frame
    assert "ACK" in answer.flags and answer.opaque_data == b"\x01\x02\x03\x04\x05\x06\x07\x08"


def test_unsolicited_ping_ack_is_ignored(peer) -> None:
    peer.send(ping(b"unasked!", flags=ACK))
    peer.expect_alive()


def test_ping_with_unknown_flags_is_answered(peer) -> None:
    peer.send(ping(b"flagged!", flags=0xFE))  # ACK bit clear, every other bit set
    answer = peer.read_until(lambda r: isinstance(r.frame, PingFrame)).frame
    assert "ACK" in answer.flags and answer.opaque_data == b"flagged!"


# ---------------------------------------------------------------------- GOAWAY, RST_STREAM, PRIORITY
def test_requests_sent_before_a_client_goaway_are_answered(peer) -> None:
    peer.send(peer.request(1, SLOW, b"0.05"), peer.request(3, ECHO, b"after"), goaway(3, 0, b"bye"))
    assert peer.response(1).message == b"slept"
    assert peer.response(3).message == b"after"


def test_rst_stream_cancels_the_handler(server, peer) -> None:
    server.handlers.started.clear()
    server.handlers.cancelled.clear()
    before = server.handlers.slow_cancelled
    peer.send(peer.request(1, SLOW, b"30"))
    # A reset read before the handler's first turn means it never runs; this case is about one running.
    assert server.handlers.started.wait(2)
    peer.send(rst_stream(1, 0x8))
    assert server.handlers.cancelled.wait(2)
    assert server.handlers.slow_cancelled > before
    peer.expect_alive()


def test_rst_stream_with_an_unknown_error_code_is_accepted(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"), rst_stream(1, 0xDEAD))
    peer.expect_alive()
    peer.send(peer.request(3, ECHO, b"next"))
    assert peer.response(3).message == b"next"


@pytest.mark.parametrize("where", ["idle", "open", "closed"])
def test_priority_is_tolerated_on_any_stream(peer, where: str) -> None:
    if where == "open":
        peer.send(peer.request(1, SLOW, b"30"), priority(1, 0))
    elif where == "closed":
        peer.send(peer.request(1, ECHO, b"done"))
        peer.response(1)
        peer.send(priority(1, 0))
    else:
        peer.send(priority(9, 0, exclusive=True))
    peer.expect_alive()
    peer.send(peer.request(11, ECHO, b"still"))
    assert peer.response(11).message == b"still"


def test_priority_depending_on_itself_is_a_stream_error(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"), priority(1, 1))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_headers_depending_on_their_own_stream_are_a_stream_error(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO), depends_on=1), data(1, grpc_message(b"x")))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_headers_with_a_valid_priority_are_served(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO), depends_on=0), data(1, grpc_message(b"prio")))
    assert peer.response(1).message == b"prio"


# ---------------------------------------------------------------------- unknown frames and flags
@pytest.mark.parametrize("stream", [0, 1, 99], ids=["stream-0", "open-stream", "idle-stream"])
def test_unknown_frame_types_are_ignored(peer, stream: int) -> None:
    peer.send(peer.request(1, SLOW, b"30", end_stream=True))
    peer.send(raw_frame(UNKNOWN_TYPE, 0xFF, stream, b"whatever it is"))
    peer.expect_alive()
    peer.send(peer.request(3, ECHO, b"ok"))
    assert peer.response(3).message == b"ok"


def test_unknown_flags_on_data_are_ignored(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)))
    peer.send(raw_frame(DATA, END_STREAM | 0x20 | 0x40 | 0x80, 1, grpc_message(b"flags")))
    assert peer.response(1).message == b"flags"

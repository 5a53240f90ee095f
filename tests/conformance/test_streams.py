"""Stream identifiers and states (RFC 9113 section 5.1): what each state accepts."""

from __future__ import annotations

import time

from hyperframe.frame import GoAwayFrame

from .harness import (
    ECHO,
    FLOW_CONTROL_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    SLOW,
    STREAM_CLOSED,
    WAIT_S,
    Peer,
    data,
    grpc_message,
    request_headers,
    rst_stream,
    window_update,
)


def test_headers_on_an_even_stream_id_is_a_protocol_error(peer) -> None:
    peer.send(peer.request(2, ECHO))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_headers_on_a_lower_stream_id_than_one_used_is_a_protocol_error(peer) -> None:
    peer.send(peer.request(5, ECHO))
    peer.response(5)
    peer.send(peer.request(3, ECHO))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_stream_ids_may_skip(peer) -> None:
    peer.send(peer.request(1, ECHO, b"a"), peer.request(101, ECHO, b"b"))
    assert peer.response(1).message == b"a"
    assert peer.response(101).message == b"b"


def test_goaway_names_the_last_stream_processed(peer) -> None:
    peer.send(peer.request(1, ECHO, b"a"), peer.request(7, ECHO, b"b"))
    peer.response(1)
    peer.response(7)
    peer.send(peer.request(4, ECHO))
    frame = peer.read_until(lambda r: isinstance(r.frame, GoAwayFrame)).frame
    assert frame.last_stream_id == 7 and frame.error_code == PROTOCOL_ERROR


def test_data_on_an_idle_stream_is_a_protocol_error(peer) -> None:
    peer.send(data(1, grpc_message(b"x")))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_rst_stream_on_an_idle_stream_is_a_protocol_error(peer) -> None:
    peer.send(rst_stream(1))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_window_update_on_an_idle_stream_is_a_protocol_error(peer) -> None:
    peer.send(window_update(1, 100))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_idle_means_above_the_highest_id_seen(peer) -> None:
    """Stream 3 is closed (skipped) once 5 is used; RST_STREAM on it is ignored, not an error."""
    peer.send(peer.request(5, ECHO))
    peer.response(5)
    peer.send(rst_stream(3), window_update(3, 10))
    peer.expect_alive()


def test_data_on_a_half_closed_remote_stream_is_stream_closed(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30", end_stream=True))
    peer.send(data(1, b"more"))
    peer.expect_rst(1, STREAM_CLOSED)


def test_headers_on_a_half_closed_remote_stream_is_stream_closed(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30", end_stream=True))
    peer.send(peer.headers_frame(1, [("x-late", "1")], end_stream=True))
    peer.expect_rst(1, STREAM_CLOSED)


def test_data_on_a_stream_already_answered_is_stream_closed(peer) -> None:
    peer.send(peer.request(1, ECHO, b"done"))
    peer.response(1)
    peer.send(data(1, b"late"))
    peer.expect_rst(1, STREAM_CLOSED)


def test_data_on_a_stream_the_client_reset_is_stream_closed(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(SLOW)), rst_stream(1))
    peer.expect_alive()
    peer.send(data(1, b"late"))
    peer.expect_rst(1, STREAM_CLOSED)


def test_headers_reusing_a_closed_stream_id_is_a_connection_error(peer) -> None:
    """RFC 9113 5.1.1: an identifier that is not larger than every one used is unexpected."""
    peer.send(peer.request(1, ECHO))
    peer.response(1)
    peer.send(peer.request(1, ECHO))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_window_update_and_rst_stream_on_a_closed_stream_are_ignored(peer) -> None:
    peer.send(peer.request(1, ECHO))
    peer.response(1)
    peer.send(window_update(1, 1000), rst_stream(1))
    peer.expect_alive()
    peer.send(peer.request(3, ECHO, b"fine"))
    assert peer.response(3).message == b"fine"


def test_window_update_on_a_half_closed_remote_stream_is_accepted(peer) -> None:
    peer.send(peer.request(1, SLOW, b"0.05"), window_update(1, 1000))
    assert peer.response(1).message == b"slept"


def test_a_stream_beyond_max_concurrent_streams_is_refused(peer) -> None:
    limit = peer.server_settings[3]
    peer.send(*[peer.request(2 * index + 1, SLOW, b"30") for index in range(limit)])
    peer.expect_alive()
    over = 2 * limit + 1
    peer.send(peer.request(over, SLOW, b"30"))
    peer.expect_rst(over, REFUSED_STREAM)


def test_a_refused_stream_does_not_reach_the_handler(server_with) -> None:
    server = server_with(H2_MAX_CONCURRENT_STREAMS=16)  # under the handlers a connection may run
    peer = Peer(server.port)
    try:
        limit = peer.server_settings[3]
        assert limit == 16
        before = server.handlers.slow_started
        peer.send(*[peer.request(2 * index + 1, SLOW, b"30") for index in range(limit)])
        deadline = time.monotonic() + WAIT_S
        while server.handlers.slow_started - before < limit and time.monotonic() < deadline:
            peer.expect_alive()  # each round trip lets the server's loop run the handlers it created
        assert server.handlers.slow_started - before == limit
        over = 2 * limit + 1
        peer.send(peer.request(over, SLOW, b"30"))
        peer.expect_rst(over, REFUSED_STREAM)
        peer.expect_alive()  # a handler created with the refusal would have started by now
        assert server.handlers.slow_started - before == limit
    finally:
        peer.close()


def test_window_update_overflowing_a_stream_is_a_stream_error(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"), window_update(1, 2**31 - 1))
    peer.expect_rst(1, FLOW_CONTROL_ERROR)

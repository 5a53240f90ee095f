"""Flow control in both directions (RFC 9113 sections 5.2, 6.9): our windows are respected, the
client's windows are enforced, SETTINGS_INITIAL_WINDOW_SIZE changes apply to open streams."""

from __future__ import annotations

from hyperframe.frame import DataFrame, HeadersFrame, WindowUpdateFrame

from .harness import (
    BIG,
    ECHO,
    FLOW_CONTROL_ERROR,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    RECEIVE_WINDOW,
    SLOW,
    Peer,
    data,
    grpc_message,
    request_headers,
    settings_frame,
    window_update,
)

MiB = 1024 * 1024


def data_sent(peer: Peer, stream_id: int) -> int:
    return sum(
        len(r.frame.data) for r in peer.received if isinstance(r.frame, DataFrame) and r.frame.stream_id == stream_id
    )


def wait_for_data(peer: Peer, stream_id: int, total: int) -> None:
    peer.read_until(lambda r: isinstance(r.frame, DataFrame) and data_sent(peer, stream_id) >= total)


def test_window_update_of_zero_on_the_connection_is_a_protocol_error(peer) -> None:
    peer.send(window_update(0, 0))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_window_update_of_zero_on_a_stream_is_a_stream_error(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"), window_update(1, 0))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_connection_window_above_2_31_minus_1_is_a_flow_control_error(peer) -> None:
    peer.send(window_update(0, MAX_WINDOW))  # 65535 + 2^31-1
    peer.expect_goaway(FLOW_CONTROL_ERROR)


def test_connection_window_of_exactly_2_31_minus_1_is_accepted(peer) -> None:
    peer.send(window_update(0, MAX_WINDOW - 65_535 - RECEIVE_WINDOW))  # the handshake granted RECEIVE_WINDOW
    peer.expect_alive()


def test_stream_window_of_exactly_2_31_minus_1_is_accepted(peer) -> None:
    peer.send(peer.request(1, SLOW, b"0.05"), window_update(1, MAX_WINDOW - RECEIVE_WINDOW))
    assert peer.response(1).message == b"slept"


def test_reply_waits_for_the_stream_window_and_resumes_on_window_update(server) -> None:
    peer = Peer(server.port, settings={INITIAL_WINDOW_SIZE: 100})
    try:
        peer.send(peer.request(1, BIG, b"1000"))
        wait_for_data(peer, 1, 100)
        peer.expect_alive()
        assert data_sent(peer, 1) == 100, "DATA beyond the stream window we granted"
        peer.send(window_update(1, 905))
        response = peer.response(1)
        assert data_sent(peer, 1) == 1005 and response.grpc_status == 0
    finally:
        peer.close()


def test_reply_waits_for_the_connection_window(server) -> None:
    peer = Peer(server.port, handshake=False)
    try:
        peer.h2.increment_flow_control_window = lambda *a, **k: None  # keep the default 65535
        peer.handshake()
        peer.send(peer.request(1, BIG, b"100000"))
        wait_for_data(peer, 1, 65_535)
        peer.expect_alive()
        assert data_sent(peer, 1) == 65_535, "DATA beyond the connection window we granted"
        peer.send(window_update(0, 100_000))
        assert peer.response(1).grpc_status == 0 and data_sent(peer, 1) == 100_005
    finally:
        peer.close()


def test_initial_window_of_zero_holds_replies_until_raised(server) -> None:
    peer = Peer(server.port, settings={INITIAL_WINDOW_SIZE: 0})
    try:
        peer.send(peer.request(1, BIG, b"10"))
        peer.read_until(lambda r: isinstance(r.frame, HeadersFrame) and r.frame.stream_id == 1)
        peer.expect_alive()
        assert data_sent(peer, 1) == 0
        peer.send(settings_frame({INITIAL_WINDOW_SIZE: 65_535}))
        assert peer.response(1).grpc_status == 0 and data_sent(peer, 1) == 15
    finally:
        peer.close()


def test_a_smaller_initial_window_can_make_a_stream_window_negative(server) -> None:
    """RFC 9113 6.9.2: the change applies to open streams; the window must come back above 0."""
    peer = Peer(server.port, settings={INITIAL_WINDOW_SIZE: 100})
    try:
        peer.send(peer.request(1, BIG, b"1000"))
        wait_for_data(peer, 1, 100)
        peer.send(settings_frame({INITIAL_WINDOW_SIZE: 50}), window_update(1, 50))  # window -50, then 0
        peer.expect_alive()
        assert data_sent(peer, 1) == 100
        peer.send(window_update(1, 905))
        assert peer.response(1).grpc_status == 0 and data_sent(peer, 1) == 1005
    finally:
        peer.close()


def test_initial_window_change_overflowing_an_open_stream_is_a_flow_control_error(peer) -> None:
    peer.send(peer.request(1, SLOW, b"30"), window_update(1, MAX_WINDOW - RECEIVE_WINDOW))
    peer.expect_alive()
    peer.send(settings_frame({INITIAL_WINDOW_SIZE: RECEIVE_WINDOW + 1}))
    peer.expect_goaway(FLOW_CONTROL_ERROR)


def test_replies_respect_the_default_max_frame_size(peer) -> None:
    peer.send(peer.request(1, BIG, b"100000"))
    peer.response(1)
    sizes = [len(r.frame.data) for r in peer.received if isinstance(r.frame, DataFrame)]
    assert max(sizes) == 16_384 and sum(sizes) == 100_005


def test_replies_use_a_larger_max_frame_size_when_allowed(server) -> None:
    peer = Peer(server.port, settings={MAX_FRAME_SIZE: 20_000})
    try:
        peer.send(peer.request(1, BIG, b"100000"))
        peer.response(1)
        sizes = [len(r.frame.data) for r in peer.received if isinstance(r.frame, DataFrame)]
        assert max(sizes) == 20_000 and sum(sizes) == 100_005
    finally:
        peer.close()


def test_credit_is_given_back_as_a_request_is_buffered(peer) -> None:
    """A full stream window of request bytes is granted again on the stream and the connection."""
    window = peer.server_settings[INITIAL_WINDOW_SIZE]
    max_frame = peer.server_settings.get(MAX_FRAME_SIZE, 16_384)
    body = grpc_message(b"w" * (2 * window))
    peer.send(peer.headers_frame(1, request_headers(ECHO)))
    sent = 0
    granted = window
    while sent < len(body):  # a correct client: never beyond the window granted so far
        while sent >= granted:
            update = peer.read_until(lambda r: isinstance(r.frame, WindowUpdateFrame) and r.frame.stream_id == 1)
            granted += update.frame.window_increment
        chunk = body[sent : min(sent + max_frame, granted, len(body))]
        peer.send(data(1, chunk, end_stream=sent + len(chunk) == len(body)))
        sent += len(chunk)
    assert peer.response(1, timeout=10).message == b"w" * (2 * window)


def test_data_beyond_the_stream_window_is_a_stream_error(server_with) -> None:
    """No credit above H2_MAX_CONNECTION_BUFFER except for the oldest request: the second stream
    can only overrun its 4 MiB window (plus at most the 1 MiB buffer of credit)."""
    server = server_with(H2_MAX_CONNECTION_BUFFER=MiB)
    peer = Peer(server.port)
    try:
        window = peer.server_settings[INITIAL_WINDOW_SIZE]
        frame = peer.server_settings.get(MAX_FRAME_SIZE, 16_384)
        peer.send(peer.headers_frame(1, request_headers(ECHO)), peer.headers_frame(3, request_headers(ECHO)))
        chunks = [data(3, b"\0" * frame, end_stream=False) for _ in range((window + 2 * MiB) // frame)]
        peer.try_send(*chunks)
        peer.expect_rst(3, FLOW_CONTROL_ERROR, timeout=5)
    finally:
        peer.close()


def test_data_beyond_the_connection_window_is_a_connection_error(server_with) -> None:
    server = server_with(H2_MAX_CONNECTION_BUFFER=MiB)
    peer = Peer(server.port)
    try:
        window = peer.server_settings[INITIAL_WINDOW_SIZE]
        frame = peer.server_settings.get(MAX_FRAME_SIZE, 16_384)
        streams = [1, 3, 5, 7, 9, 11]
        peer.send(*[peer.headers_frame(stream, request_headers(ECHO)) for stream in streams])
        chunks = [
            data(stream, b"\0" * frame, end_stream=False) for stream in streams[1:] for _ in range(window // frame)
        ]  # 5 streams x 4 MiB: within each stream window, 20 MiB against a 16 MiB connection window
        peer.try_send(*chunks)
        peer.expect_goaway(FLOW_CONTROL_ERROR, timeout=5)
    finally:
        peer.close()


def test_empty_data_with_end_stream_completes_a_request(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, grpc_message(b"e"), end_stream=False), data(1, b""))
    assert peer.response(1).message == b"e"

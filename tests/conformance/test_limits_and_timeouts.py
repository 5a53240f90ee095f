"""Resource limits and timeouts (docs/front-door.md, "Resource limits"), each on a server started
with a small value of its variable so the case stays short."""

from __future__ import annotations

import socket
import time

import pytest
from hyperframe.frame import RstStreamFrame

from mishards.protocol.server import MAX_WORK_PER_CONNECTION

from .harness import (
    CANCEL,
    ECHO,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    NO_ERROR,
    PREFACE,
    REFUSED_STREAM,
    SLOW,
    WAIT_S,
    Peer,
    data,
    grpc_message,
    raw_frame,
    request_headers,
    rst_stream,
    settings_frame,
)

SHORT = 0.5  # seconds: the timeouts these servers get


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server ends the connection within `seconds` (whatever it sends before)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, ConnectionAbortedError):
            return True
        except TimeoutError:
            return False
    return False


def test_silent_connection_is_closed_after_the_handshake_timeout(server_with) -> None:
    server = server_with(H2_HANDSHAKE_TIMEOUT=SHORT)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        assert closed_within(sock, SHORT + WAIT_S)
        assert time.monotonic() - start >= SHORT * 0.8


def test_preface_without_settings_is_closed_after_the_handshake_timeout(server_with) -> None:
    server = server_with(H2_HANDSHAKE_TIMEOUT=SHORT)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(PREFACE)
        assert closed_within(sock, SHORT + WAIT_S)


def test_handshake_timeout_does_not_touch_a_finished_handshake(server_with) -> None:
    server = server_with(H2_HANDSHAKE_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        peer.send(peer.request(1, SLOW, b"%f" % (SHORT * 2)))
        assert peer.response(1, timeout=SHORT * 2 + WAIT_S).message == b"slept"
    finally:
        peer.close()


def test_idle_connection_gets_goaway_no_error_after_the_idle_timeout(server_with) -> None:
    server = server_with(H2_IDLE_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        peer.expect_goaway(NO_ERROR, timeout=SHORT + WAIT_S)
    finally:
        peer.close()


def test_idle_timeout_waits_for_running_streams(server_with) -> None:
    server = server_with(H2_IDLE_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        peer.send(peer.request(1, SLOW, b"%f" % (SHORT * 3)))
        assert peer.response(1, timeout=SHORT * 3 + WAIT_S).message == b"slept"
    finally:
        peer.close()


def test_unfinished_request_is_cancelled_after_the_read_timeout(server_with) -> None:
    server = server_with(H2_READ_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, b"\0\0\0\0\x10part", end_stream=False))
        peer.expect_rst(1, CANCEL, timeout=SHORT + WAIT_S)
    finally:
        peer.close()


def test_read_timeout_does_not_cancel_a_request_that_keeps_arriving(server_with) -> None:
    server = server_with(H2_READ_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        message = grpc_message(b"abcdef")
        peer.send(peer.headers_frame(1, request_headers(ECHO)))
        for index in range(len(message)):  # one byte per SHORT/3: slow, never silent for SHORT
            peer.send(data(1, message[index : index + 1], end_stream=index == len(message) - 1))
            time.sleep(SHORT / 3)
        assert peer.response(1).message == b"abcdef"
        assert not any(isinstance(r.frame, RstStreamFrame) for r in peer.received)
    finally:
        peer.close()


def test_unfinished_header_block_ends_the_connection_after_the_read_timeout(server_with) -> None:
    server = server_with(H2_READ_TIMEOUT=SHORT)
    peer = Peer(server.port)
    try:
        block = peer.encode(request_headers(ECHO))
        peer.send(raw_frame(HEADERS, 0, 1, block[:5]))
        assert closed_within(peer.sock, SHORT + WAIT_S)
    finally:
        peer.close()


def test_connection_over_the_limit_is_closed_at_once(server_with) -> None:
    server = server_with(H2_MAX_CONNECTIONS=3)
    peers = [Peer(server.port) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            extra.sendall(PREFACE)
            assert closed_within(extra, WAIT_S)
        for index, peer in enumerate(peers):
            peer.send(peer.request(1, ECHO, b"%d" % index))
            assert peer.response(1).message == b"%d" % index
    finally:
        for peer in peers:
            peer.close()


def test_a_closed_connection_frees_its_place(server_with) -> None:
    server = server_with(H2_MAX_CONNECTIONS=1)
    Peer(server.port).close()
    deadline = time.monotonic() + WAIT_S
    while server.connection_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    peer = Peer(server.port)
    try:
        peer.send(peer.request(1, ECHO, b"in"))
        assert peer.response(1).message == b"in"
    finally:
        peer.close()


def test_max_concurrent_streams_setting_is_advertised_and_enforced(server_with) -> None:
    server = server_with(H2_MAX_CONCURRENT_STREAMS=4)
    peer = Peer(server.port)
    try:
        assert peer.server_settings.get(MAX_CONCURRENT_STREAMS) == 4
        peer.send(*[peer.request(1 + 2 * i, SLOW, b"30") for i in range(4)])
        peer.expect_alive()
        peer.send(peer.request(9, SLOW, b"30"))
        peer.expect_rst(9, REFUSED_STREAM)
    finally:
        peer.close()


def test_max_header_list_size_setting_is_advertised_and_enforced(server_with) -> None:
    server = server_with(H2_MAX_HEADER_LIST_SIZE=1024)
    peer = Peer(server.port)
    try:
        assert peer.server_settings.get(MAX_HEADER_LIST_SIZE) == 1024
        peer.send(peer.request(1, headers=request_headers(ECHO, extra=[("x-pad", "p" * 1000)])))
        response = peer.response(1)
        assert response.grpc_status == 8 and "1024" in response.grpc_message
    finally:
        peer.close()


@pytest.mark.parametrize("same_write", [True, False], ids=["reset-in-the-same-write", "reset-after-handler-start"])
def test_a_stream_the_client_reset_frees_its_slot_once_its_handler_ended(server_with, same_write: bool) -> None:
    """The slot of a reset stream is free again once its handler is gone (here: at once, since
    cancellation is immediate), and resetting cannot run more handlers than the limit."""
    server = server_with(H2_MAX_CONCURRENT_STREAMS=2)
    peer = Peer(server.port)
    try:
        opened = peer.request(1, SLOW, b"30") + peer.request(3, SLOW, b"30")
        if same_write:  # one sendall: the server reads the request and its reset together
            peer.send(opened, rst_stream(1))
        else:
            peer.send(opened)
            peer.expect_alive()
            peer.send(rst_stream(1))
        peer.expect_alive()
        # The slot comes back when the cancelled handler's task has ended, a loop turn or two
        # after the reset: a new stream may be refused meanwhile, never for long.
        deadline = time.monotonic() + WAIT_S
        stream_id, served = 5, False
        while not served and time.monotonic() < deadline:
            peer.send(peer.request(stream_id, ECHO, b"fits"))
            answer = peer.read_until(
                lambda r, s=stream_id: r.frame.stream_id == s and (isinstance(r.frame, RstStreamFrame) or r.headers)
            )
            served = not isinstance(answer.frame, RstStreamFrame)
            stream_id += 2
        assert served, "the reset stream's slot never came back"
        assert server.handlers.slow_started - server.handlers.slow_cancelled <= 2
    finally:
        peer.close()


# ---------------------------------------------------------------------- work per connection
def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_requests_beyond_the_work_limit_wait_their_turn(server) -> None:
    """A thousand searches in one write must not all reach the nodes at once: at most
    MAX_WORK_PER_CONNECTION handlers of a connection run; the others start as slots free."""
    handlers = server.handlers
    started, cancelled = handlers.slow_started, handlers.slow_cancelled
    peer = Peer(server.port)
    try:
        streams = [1 + 2 * i for i in range(MAX_WORK_PER_CONNECTION + 10)]
        peer.send(*(peer.request(stream_id, SLOW, b"30") for stream_id in streams))
        _until(lambda: handlers.slow_started - started == MAX_WORK_PER_CONNECTION, "the first handlers start")
        peer.expect_alive()
        assert handlers.slow_started - started == MAX_WORK_PER_CONNECTION, "no more than the limit run"
        peer.send(*(rst_stream(stream_id) for stream_id in streams[:4]))  # four running ones end ...
        _until(lambda: handlers.slow_started - started == MAX_WORK_PER_CONNECTION + 4, "waiting ones start")
        peer.expect_alive()
        assert handlers.slow_started - started == MAX_WORK_PER_CONNECTION + 4  # ... so four waiting ones start
        peer.send(*(rst_stream(stream_id) for stream_id in streams[-3:]))  # waiting ones reset never start
        peer.send(*(rst_stream(stream_id) for stream_id in streams[4:20]))
        _until(lambda: handlers.slow_cancelled - cancelled == 20, "the running ones reset end")
        _until(lambda: handlers.slow_started - started == MAX_WORK_PER_CONNECTION + 7, "the rest start")
        peer.expect_alive()
        assert handlers.slow_started - started == MAX_WORK_PER_CONNECTION + 7, "reset while waiting: never started"
    finally:
        peer.close()


def test_answers_the_client_does_not_take_hold_its_further_requests(server) -> None:
    """With its windows at zero a client takes no answer; once MAX_WORK_PER_CONNECTION answers wait
    for it, its further requests wait too, and all are served once it opens its windows."""
    handlers = server.handlers
    echoed = handlers.echoed
    peer = Peer(server.port, settings={INITIAL_WINDOW_SIZE: 0})
    try:
        streams = [1 + 2 * i for i in range(MAX_WORK_PER_CONNECTION + 6)]
        peer.send(*(peer.request(stream_id, ECHO, b"answer") for stream_id in streams))
        _until(lambda: handlers.echoed - echoed == MAX_WORK_PER_CONNECTION, "the first requests are answered")
        peer.expect_alive()
        peer.expect_alive()
        assert handlers.echoed - echoed == MAX_WORK_PER_CONNECTION, "the rest wait for answers to be taken"
        peer.send(settings_frame({INITIAL_WINDOW_SIZE: 65_535}))
        for stream_id in streams:
            assert peer.response(stream_id).message == b"answer"
        assert handlers.echoed - echoed == len(streams)
    finally:
        peer.close()

"""The abuse budgets (docs/front-door.md, "Abuse limits"): each exhausted budget gives GOAWAY
ENHANCE_YOUR_CALM with debug data naming it and closes the connection; below it the connection
lives. Bursts are sent in one write, far faster than the buckets refill (N per 10 s), and
exhaustion is asserted at 1.5 N so a refill during the burst cannot hide it."""

from __future__ import annotations

import time

import pytest

from .harness import (
    ACK,
    CONTINUATION,
    ECHO,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    HEADERS,
    SLOW,
    UNKNOWN_TYPE,
    Peer,
    data,
    ping,
    priority,
    raw_frame,
    request_headers,
    rst_stream,
    settings_frame,
    window_update,
)

MAX_RESETS, MAX_PINGS, MAX_SETTINGS, MAX_EMPTY = 200, 100, 100, 1000


def resets(peer: Peer, count: int, first: int = 1) -> list[bytes]:
    frames = []
    for index in range(count):
        stream_id = first + 2 * index
        frames += [peer.headers_frame(stream_id, request_headers(SLOW)), rst_stream(stream_id)]
    return frames


def test_rapid_reset_exhausts_the_reset_budget(peer) -> None:
    peer.try_send(*resets(peer, MAX_RESETS * 3 // 2))
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_resets")


def test_rapid_reset_in_a_second_write_exhausts_the_reset_budget(peer) -> None:
    count = MAX_RESETS * 3 // 2
    opened = [peer.headers_frame(1 + 2 * i, request_headers(SLOW)) for i in range(count)]
    peer.send(*opened)
    peer.try_send(*[rst_stream(1 + 2 * i) for i in range(count)])
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_resets")


def test_resets_below_the_budget_keep_the_connection(peer) -> None:
    peer.send(*resets(peer, MAX_RESETS * 9 // 10))
    peer.expect_alive()
    peer.send(peer.request(1001, ECHO, b"ok"))
    assert peer.response(1001).message == b"ok"


def test_refused_streams_count_against_the_reset_budget(peer) -> None:
    limit = peer.server_settings[3]
    peer.send(*[peer.request(1 + 2 * i, SLOW, b"30") for i in range(limit)])
    peer.expect_alive()
    first = 1 + 2 * limit
    peer.try_send(*[peer.request(first + 2 * i, SLOW, b"30") for i in range(MAX_RESETS * 3 // 2)])
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_resets")


def test_ping_flood_exhausts_the_ping_budget(peer) -> None:
    peer.try_send(*[ping(b"%08d" % i) for i in range(MAX_PINGS * 3 // 2)])
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_pings")


def test_pings_below_the_budget_keep_the_connection(peer) -> None:
    peer.send(*[ping(b"%08d" % i) for i in range(MAX_PINGS * 8 // 10)])
    peer.expect_alive()


def test_ping_acks_are_not_counted(peer) -> None:
    peer.send(*[ping(b"%08d" % i, flags=ACK) for i in range(MAX_PINGS * 3)])
    peer.expect_alive()


def test_settings_flood_exhausts_the_settings_budget(peer) -> None:
    peer.try_send(*[settings_frame({4: 65_535 + i}) for i in range(MAX_SETTINGS * 3 // 2)])
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_settings")


def test_settings_below_the_budget_keep_the_connection(peer) -> None:
    peer.send(*[settings_frame({4: 65_535 + i}) for i in range(MAX_SETTINGS * 8 // 10)])
    peer.expect_alive()


def empty_continuation_blocks(peer: Peer, frames: int) -> list[bytes]:
    """Header blocks of an empty HEADERS, 62 empty CONTINUATIONs and a last one carrying the block."""
    out = []
    stream_id = 1
    while len(out) < frames:
        block = peer.encode(request_headers(ECHO))
        out.append(raw_frame(HEADERS, END_STREAM, stream_id, b""))
        out += [raw_frame(CONTINUATION, 0, stream_id, b"") for _ in range(62)]
        out.append(raw_frame(CONTINUATION, END_HEADERS, stream_id, block))
        stream_id += 2
    return out


@pytest.mark.parametrize("kind", ["DATA", "PRIORITY", "unknown", "CONTINUATION"])
def test_empty_frame_flood_exhausts_the_empty_frame_budget(peer, kind: str) -> None:
    count = MAX_EMPTY * 3 // 2
    if kind == "DATA":
        frames = [peer.headers_frame(1, request_headers(SLOW))] + [data(1, b"", end_stream=False)] * count
    elif kind == "PRIORITY":
        frames = [priority(1 + 2 * (i % 50), 0) for i in range(count)]
    elif kind == "unknown":
        frames = [raw_frame(UNKNOWN_TYPE, 0, 0, b"")] * count
    else:
        frames = empty_continuation_blocks(peer, count)
    peer.try_send(*frames)
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_empty_frames")


def test_empty_frames_below_the_budget_keep_the_connection(peer) -> None:
    count = MAX_EMPTY * 8 // 10
    peer.send(peer.headers_frame(1, request_headers(SLOW)), *[data(1, b"", end_stream=False)] * count)
    peer.expect_alive()


def test_budgets_are_separate(peer) -> None:
    """Most of every budget at once is still below each one."""
    peer.send(
        *[ping(b"%08d" % i) for i in range(MAX_PINGS * 7 // 10)],
        *[settings_frame() for _ in range(MAX_SETTINGS * 7 // 10)],
        *resets(peer, MAX_RESETS * 7 // 10),
        *[raw_frame(UNKNOWN_TYPE, 0, 0, b"")] * (MAX_EMPTY * 7 // 10),
    )
    peer.expect_alive()


def test_a_budget_refills_over_its_window(server_with) -> None:
    """10 PINGs per 1 s: 10 now, 10 once the window has passed (time is the property here)."""
    import time

    server = server_with(H2_MAX_PINGS=10, H2_ABUSE_WINDOW=1)
    peer = Peer(server.port)
    try:
        peer.send(*[ping(b"%08d" % i) for i in range(9)])
        peer.read_until(lambda r: r.frame.type == 6 and r.frame.opaque_data == b"00000008")
        time.sleep(1.2)
        peer.send(*[ping(b"%08d" % i) for i in range(9)])
        peer.expect_alive()
        peer.try_send(*[ping(b"%08d" % i) for i in range(30)])
        peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_pings")
    finally:
        peer.close()


def _offend(port: int) -> Peer:
    abuser = Peer(port)
    abuser.try_send(*[ping(b"%08d" % i) for i in range(MAX_PINGS * 3 // 2)])
    abuser.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_pings")
    return abuser


def test_an_abusers_new_connections_are_served_late_so_its_resets_cost_nothing(server_with) -> None:
    """After a GOAWAY ENHANCE_YOUR_CALM its address is on probation: a new connection is served,
    but a request starts late, so one reset a moment after it never reaches the handler; a
    connection the address already had goes on as before."""
    server = server_with(H2_ABUSE_PROBATION=30)
    established = Peer(server.port)
    abuser = _offend(server.port)
    again = Peer(server.port)
    try:
        before = server.handlers.slow_started
        again.send(again.request(1, SLOW, b"5"))
        time.sleep(0.02)
        again.send(rst_stream(1))
        again.send(again.request(3, ECHO, b"late but served"))
        started = time.monotonic()
        assert again.response(3).message == b"late but served"
        assert time.monotonic() - started >= 0.09  # PROBATION_START_S
        assert server.handlers.slow_started == before  # the reset request never ran
        established.send(established.request(1, SLOW, b"5"))
        time.sleep(0.02)
        established.send(rst_stream(1))
        established.expect_alive()
        assert server.handlers.slow_started == before + 1  # a connection from before starts at once
    finally:
        for peer in (established, abuser, again):
            peer.close()


def test_connections_on_probation_share_one_frame_pacer(server_with) -> None:
    """Frames from an address on probation cost it time: with 100 frames per second shared by its
    connections, 450 WINDOW_UPDATEs over three fresh connections take seconds to be read (each
    connection alone would be paced for half a second)."""
    server = server_with(H2_ABUSE_PROBATION=30, H2_MAX_CONTROL_FRAMES=100, H2_ABUSE_WINDOW=1)
    abuser = _offend(server.port)
    peers = [Peer(server.port) for _ in range(3)]
    try:
        started = time.monotonic()
        for peer in peers:
            peer.send(*[window_update(0, 1) for _ in range(150)])
        time.sleep(0.3)  # read, and each connection paused, before the PINGs arrive
        for peer in peers:
            peer.expect_alive(timeout=15)
        assert time.monotonic() - started >= 2.5  # 450 frames beyond a bucket of 100, at 100 per second
    finally:
        for peer in [abuser, *peers]:
            peer.close()


def test_without_probation_an_abuser_is_served_at_once(server_with) -> None:
    server = server_with(H2_ABUSE_PROBATION=0)
    abuser = _offend(server.port)
    abuser.close()
    again = Peer(server.port)
    try:
        before = server.handlers.slow_started
        again.send(again.request(1, SLOW, b"5"))
        time.sleep(0.05)
        again.send(rst_stream(1))
        again.expect_alive()
        assert server.handlers.slow_started == before + 1
    finally:
        again.close()


def test_a_window_update_flood_pauses_reading_instead_of_taking_the_loop(server_with) -> None:
    """WINDOW_UPDATEs are legal one by one, but beyond what the connection's traffic accounts for
    they are paced (H2_MAX_CONTROL_FRAMES per window): the PING behind 400 of them waits for the
    pause, and the connection lives on."""
    server = server_with(H2_MAX_CONTROL_FRAMES=100, H2_ABUSE_WINDOW=1)
    peer = Peer(server.port)
    try:
        peer.expect_alive()
        started = time.monotonic()
        peer.send(*[window_update(0, 1) for _ in range(400)])
        peer.expect_alive(timeout=15)
        assert time.monotonic() - started >= 1.5  # at least 150 frames of debt at 100 per second
        peer.send(peer.request(1, ECHO, b"still served"))
        assert peer.response(1).message == b"still served"
    finally:
        peer.close()


def test_replies_earn_their_window_updates(server_with) -> None:
    """A client that answers each DATA frame with WINDOW_UPDATEs, as many clients do, is not paced."""
    server = server_with(H2_MAX_CONTROL_FRAMES=100, H2_ABUSE_WINDOW=1)
    peer = Peer(server.port)
    try:
        started = time.monotonic()
        for round_ in range(10):
            stream_ids = [1 + 2 * (round_ * 30 + i) for i in range(30)]
            peer.send(*[peer.request(stream_id, ECHO, b"x" * 100) for stream_id in stream_ids])
            for stream_id in stream_ids:
                peer.response(stream_id)
            peer.send(
                *[frame for stream_id in stream_ids for frame in (window_update(stream_id, 105), window_update(0, 105))]
            )
        peer.expect_alive()
        assert time.monotonic() - started < 1.0
    finally:
        peer.close()

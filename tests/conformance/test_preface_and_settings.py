"""Connection preface, the server's own SETTINGS, and each SETTINGS parameter's range (RFC 9113
sections 3.4, 6.5)."""

from __future__ import annotations

import pytest
from hyperframe.frame import GoAwayFrame, SettingsFrame, WindowUpdateFrame

from .harness import (
    ACK,
    ENABLE_PUSH,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADER_TABLE_SIZE,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    PREFACE,
    PROTOCOL_ERROR,
    SETTINGS,
    WAIT_S,
    Peer,
    ping,
    raw_frame,
    settings_frame,
)


def raw_connection(port: int) -> Peer:
    return Peer(port, handshake=False)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
        b"\x00" * 24,
    ],
    ids=["http1", "preface-one-word-wrong", "tls-hello", "zeros"],
)
def test_bytes_that_are_not_the_preface_get_goaway_protocol_error(server, garbage: bytes) -> None:
    client = raw_connection(server.port)
    client.send(garbage)
    client.expect_goaway(PROTOCOL_ERROR)


def test_preface_arriving_byte_by_byte_is_accepted(server) -> None:
    client = raw_connection(server.port)
    for index in range(len(PREFACE)):
        client.send(PREFACE[index : index + 1])
    client.send(settings_frame())
    client.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags)
    client.expect_alive()


def test_preface_not_followed_by_settings_is_a_protocol_error(server) -> None:
    """RFC 9113 3.4: the preface is the magic string followed by a SETTINGS frame."""
    client = raw_connection(server.port)
    client.send(PREFACE + ping())
    client.expect_goaway(PROTOCOL_ERROR)


def test_server_preface_is_a_settings_frame_first(server) -> None:
    client = raw_connection(server.port)
    client.send(PREFACE + settings_frame())
    first = client.read_until(lambda r: True)
    assert isinstance(first.frame, SettingsFrame) and "ACK" not in first.frame.flags, first


def test_server_advertises_the_contract_settings(peer) -> None:
    """4 MiB stream window, push off, 1024 streams, 16384 bytes of header list (docs/front-door.md)."""
    assert peer.server_settings.get(INITIAL_WINDOW_SIZE) == 4 * 1024 * 1024
    assert peer.server_settings.get(ENABLE_PUSH) == 0
    assert peer.server_settings.get(MAX_CONCURRENT_STREAMS) == 1024
    assert peer.server_settings.get(MAX_HEADER_LIST_SIZE) == 16384


def test_server_opens_a_16_mib_connection_window(server) -> None:
    client = raw_connection(server.port)
    client.send(PREFACE + settings_frame())
    update = client.read_until(lambda r: isinstance(r.frame, WindowUpdateFrame) and r.frame.stream_id == 0)
    assert update.frame.window_increment + 65_535 == 16 * 1024 * 1024


def test_every_settings_frame_is_acknowledged(peer) -> None:
    peer.send(settings_frame({INITIAL_WINDOW_SIZE: 1000}), settings_frame({HEADER_TABLE_SIZE: 0}))
    peer.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags)
    peer.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags)
    peer.expect_alive()


@pytest.mark.parametrize(
    "pairs",
    [
        {ENABLE_PUSH: 0},
        {ENABLE_PUSH: 1},
        {MAX_FRAME_SIZE: 16_384},
        {MAX_FRAME_SIZE: 16_777_215},
        {INITIAL_WINDOW_SIZE: 0},
        {INITIAL_WINDOW_SIZE: MAX_WINDOW},
        {HEADER_TABLE_SIZE: 0},
        {HEADER_TABLE_SIZE: 2**32 - 1},
        {MAX_CONCURRENT_STREAMS: 0},
        {MAX_HEADER_LIST_SIZE: 1},
        {0x0: 5, 0xFF: 7, 0xFFFF: 2**32 - 1},  # unknown identifiers are ignored
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_settings_values_in_range_are_accepted(peer, pairs: dict[int, int]) -> None:
    peer.send(settings_frame(pairs))
    peer.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags)
    peer.expect_alive()


@pytest.mark.parametrize(
    ("pairs", "code"),
    [
        ({ENABLE_PUSH: 2}, PROTOCOL_ERROR),
        ({ENABLE_PUSH: 2**32 - 1}, PROTOCOL_ERROR),
        ({MAX_FRAME_SIZE: 16_383}, PROTOCOL_ERROR),
        ({MAX_FRAME_SIZE: 16_777_216}, PROTOCOL_ERROR),
        ({MAX_FRAME_SIZE: 0}, PROTOCOL_ERROR),
        ({INITIAL_WINDOW_SIZE: 2**31}, FLOW_CONTROL_ERROR),
        ({INITIAL_WINDOW_SIZE: 2**32 - 1}, FLOW_CONTROL_ERROR),
    ],
    ids=["push=2", "push=max", "frame=16383", "frame=2^24", "frame=0", "window=2^31", "window=2^32-1"],
)
def test_settings_values_out_of_range_are_connection_errors(peer, pairs: dict[int, int], code: int) -> None:
    peer.send(settings_frame(pairs))
    peer.expect_goaway(code)


@pytest.mark.parametrize("length", [1, 5, 7], ids=lambda n: f"{n}-bytes")
def test_settings_length_not_a_multiple_of_6_is_a_frame_size_error(peer, length: int) -> None:
    peer.send(raw_frame(SETTINGS, 0, 0, b"\0" * length))
    peer.expect_goaway(FRAME_SIZE_ERROR)


def test_settings_ack_with_a_payload_is_a_frame_size_error(peer) -> None:
    peer.send(raw_frame(SETTINGS, ACK, 0, b"\0" * 6))
    peer.expect_goaway(FRAME_SIZE_ERROR)


def test_settings_on_a_stream_is_a_protocol_error(peer) -> None:
    peer.send(raw_frame(SETTINGS, 0, 1, b""))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_half_a_preface_then_silence_keeps_the_socket_until_the_handshake_timeout(server) -> None:
    """A partial preface is not an error by itself: nothing is answered before the rest arrives."""
    client = raw_connection(server.port)
    client.send(PREFACE[:10])
    client.sock.settimeout(0.3)
    try:
        chunk = client.sock.recv(100)
    except TimeoutError:
        chunk = None
    # the server may have sent its SETTINGS already, never a GOAWAY
    if chunk:
        assert not any(isinstance(r.frame, GoAwayFrame) for r in client.received)
    client.send(PREFACE[10:] + settings_frame())
    client.read_until(lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags, WAIT_S)

"""HPACK (RFC 7541) and header blocks across CONTINUATION frames (RFC 9113 sections 4.3, 6.10),
with the contract's bounds on header blocks."""

from __future__ import annotations

import pytest

from .harness import (
    COMPRESSION_ERROR,
    CONTINUATION,
    ECHO,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GRPC_RESOURCE_EXHAUSTED,
    HEADERS,
    PROTOCOL_ERROR,
    SLOW,
    UNKNOWN_TYPE,
    data,
    grpc_message,
    ping,
    priority,
    raw_frame,
    request_headers,
    rst_stream,
    settings_frame,
    window_update,
)


def hpack_string(value: bytes) -> bytes:
    assert len(value) < 127
    return bytes((len(value),)) + value


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
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


def literal_indexed(name: bytes, value: bytes) -> bytes:
    """Literal with incremental indexing, new name: the field enters the dynamic table."""
    return b"\x40" + hpack_string(name) + hpack_int(len(value), 7, 0) + value


def literal(name: bytes, value: bytes) -> bytes:
    return b"\x00" + hpack_string(name) + hpack_int(len(value), 7, 0) + value


# A request's mandatory fields as raw HPACK: :method POST, :scheme http, :path (literal), content-type, te.
def base_block(path: bytes = ECHO.encode()) -> bytes:
    return (
        b"\x83\x86"
        + b"\x04"
        + hpack_string(path)
        + literal(b"content-type", b"application/grpc")
        + literal(b"te", b"trailers")
    )


@pytest.mark.parametrize(
    "block",
    [b"\x80", b"\xfe", b"\x1f", b"\x00\x85ab", b"\x00\x81\xff\x81a", b"\xff" * 9 + b"\x7f"],
    ids=["index-0", "index-beyond-table", "truncated-integer", "truncated-string", "bad-huffman", "integer-overflow"],
)
def test_hpack_that_does_not_decode_is_a_compression_error(peer, block: bytes) -> None:
    peer.send(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    peer.expect_goaway(COMPRESSION_ERROR)


def test_table_size_update_above_our_setting_is_a_compression_error(peer) -> None:
    peer.send(raw_frame(HEADERS, END_HEADERS, 1, hpack_int(4097, 5, 0x20) + base_block()))
    peer.expect_goaway(COMPRESSION_ERROR)


def test_table_size_update_after_a_field_is_a_compression_error(peer) -> None:
    peer.send(raw_frame(HEADERS, END_HEADERS, 1, base_block() + hpack_int(0, 5, 0x20)))
    peer.expect_goaway(COMPRESSION_ERROR)


@pytest.mark.parametrize("size", [0, 256, 4096])
def test_table_size_updates_within_our_setting_are_accepted(peer, size: int) -> None:
    peer.send(raw_frame(HEADERS, END_HEADERS, 1, hpack_int(size, 5, 0x20) + base_block()), data(1, grpc_message(b"t")))
    assert peer.response(1).message == b"t"


def test_dynamic_table_entries_are_remembered_across_requests(peer) -> None:
    first = base_block() + literal_indexed(b"x-tenant", b"blue")
    peer.send(raw_frame(HEADERS, END_HEADERS, 1, first), data(1, grpc_message(b"1")))
    assert peer.response(1).message == b"1"
    peer.send(raw_frame(HEADERS, END_HEADERS, 3, base_block() + b"\xbe"), data(3, grpc_message(b"2")))  # index 62
    assert peer.response(3).message == b"2"


def test_hpack_bomb_is_enhance_your_calm(peer) -> None:
    """A 4 KB field in the dynamic table referenced by 70 one-byte indexes: ~4 KB on the wire,
    ~285 KB decoded, past the contract's 256 KiB."""
    block = base_block() + literal_indexed(b"x-bomb", b"b" * 4000) + b"\xbe" * 70
    peer.send(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_header_bytes")


def test_decoded_headers_over_the_list_limit_but_under_the_bomb_limit_keep_the_table_in_sync(peer) -> None:
    """RESOURCE_EXHAUSTED on the stream; the block was still decoded, so the next request's
    reference to the dynamic table entry it added means the same thing on both sides."""
    block = base_block() + literal_indexed(b"x-big", b"s" * 3000) + b"\xbe" * 5
    peer.send(raw_frame(HEADERS, END_HEADERS, 1, block), data(1, grpc_message(b"a")))
    assert peer.response(1).grpc_status == GRPC_RESOURCE_EXHAUSTED
    peer.send(raw_frame(HEADERS, END_HEADERS, 3, base_block() + b"\xbe"), data(3, grpc_message(b"b")))
    assert peer.response(3).message == b"b"


def test_compressed_header_block_over_256_kib_is_enhance_your_calm(peer) -> None:
    fields = b"".join(literal(b"x-h%d" % index, b"v" * 1000) for index in range(270))
    block = base_block() + fields
    size = 16_384
    pieces = [block[index : index + size] for index in range(0, len(block), size)]
    frames = [raw_frame(HEADERS, END_STREAM, 1, pieces[0])]
    frames += [raw_frame(CONTINUATION, 0, 1, piece) for piece in pieces[1:-1]]
    frames.append(raw_frame(CONTINUATION, END_HEADERS, 1, pieces[-1]))
    peer.try_send(*frames)
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_header_bytes")


def continued(block: bytes, pieces: int, stream_id: int = 1, end_stream: bool = False) -> list[bytes]:
    """HEADERS plus `pieces` - 1 CONTINUATION frames carrying `block`, split as evenly as possible."""
    size = max(-(-len(block) // pieces), 1)
    parts = [block[index * size : (index + 1) * size] for index in range(pieces)]
    frames = [raw_frame(HEADERS, END_STREAM if end_stream else 0, stream_id, parts[0])]
    for index, part in enumerate(parts[1:], start=2):
        frames.append(raw_frame(CONTINUATION, END_HEADERS if index == pieces else 0, stream_id, part))
    return frames


def test_header_block_in_three_frames_is_served(peer) -> None:
    peer.send(*continued(base_block(), 3), data(1, grpc_message(b"c3")))
    assert peer.response(1).message == b"c3"


def test_header_block_in_64_continuations_is_served(peer) -> None:
    block = base_block() + b"".join(literal(b"x-%d" % i, b"v") for i in range(70))
    peer.send(*continued(block, 65), data(1, grpc_message(b"c64")))
    assert peer.response(1).message == b"c64"


def test_more_than_64_continuations_are_enhance_your_calm(peer) -> None:
    block = base_block() + b"".join(literal(b"x-%d" % i, b"v") for i in range(70))
    peer.send(*continued(block, 66))
    peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_continuations")


def test_trailers_across_a_continuation_complete_the_request(peer) -> None:
    trailer_block = literal(b"x-trailer", b"yes")
    peer.send(
        peer.headers_frame(1, request_headers(ECHO)),
        data(1, grpc_message(b"tr"), end_stream=False),
        raw_frame(HEADERS, END_STREAM, 1, trailer_block[:3]),
        raw_frame(CONTINUATION, END_HEADERS, 1, trailer_block[3:]),
    )
    assert peer.response(1).message == b"tr"


def test_empty_continuation_may_end_a_block(peer) -> None:
    peer.send(raw_frame(HEADERS, 0, 1, base_block()), raw_frame(CONTINUATION, END_HEADERS, 1, b""))
    peer.send(data(1, grpc_message(b"e")))
    assert peer.response(1).message == b"e"


def test_continuation_without_a_header_block_is_a_protocol_error(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(SLOW)), raw_frame(CONTINUATION, END_HEADERS, 1, b"\x82"))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_continuation_on_an_idle_stream_is_a_protocol_error(peer) -> None:
    peer.send(raw_frame(CONTINUATION, END_HEADERS, 1, base_block()))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_continuation_after_the_block_ended_is_a_protocol_error(peer) -> None:
    peer.send(*continued(base_block(), 2), raw_frame(CONTINUATION, END_HEADERS, 1, b""))
    peer.expect_goaway(PROTOCOL_ERROR)


def test_continuation_on_another_stream_is_a_protocol_error(peer) -> None:
    peer.send(raw_frame(HEADERS, 0, 1, base_block()), raw_frame(CONTINUATION, END_HEADERS, 3, b""))
    peer.expect_goaway(PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "interleaved",
    [
        data(1, b"x"),
        ping(),
        priority(1, 0),
        window_update(0, 100),
        rst_stream(1),
        settings_frame(),
        raw_frame(UNKNOWN_TYPE, 0, 0, b"?"),
        "headers-on-another-stream",
    ],
    ids=["DATA", "PING", "PRIORITY", "WINDOW_UPDATE", "RST_STREAM", "SETTINGS", "unknown-type", "HEADERS-3"],
)
def test_any_frame_inside_a_header_block_is_a_protocol_error(peer, interleaved) -> None:
    if interleaved == "headers-on-another-stream":
        interleaved = raw_frame(HEADERS, END_HEADERS, 3, base_block())
    block = base_block()
    peer.send(raw_frame(HEADERS, 0, 1, block[:4]), interleaved, raw_frame(CONTINUATION, END_HEADERS, 1, block[4:]))
    peer.expect_goaway(PROTOCOL_ERROR)

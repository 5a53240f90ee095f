"""The gRPC-level answers of the contract: trailers-only, HTTP 200, the connection goes on."""

from __future__ import annotations

import gzip

import pytest

from .harness import (
    ECHO,
    ENHANCE_YOUR_CALM,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNIMPLEMENTED,
    SLOW,
    Peer,
    data,
    grpc_message,
    header_list_size,
    request_headers,
)

HEADER_LIMIT = 16_384
MESSAGE_LIMIT = 60_000  # H2_MAX_MESSAGE_SIZE of the server these cases start (a body fits one frame)


def assert_trailers_only(response, code: int) -> None:
    assert response.body == b"" and not response.trailers, "a trailers-only answer carries no DATA"
    assert response.header(":status") == "200"
    assert response.grpc_status == code, (response.grpc_status, response.grpc_message)


def padded_headers(total: int, secret: str = "s") -> list[tuple[str, str]]:
    """A request whose header list has exactly `total` bytes (RFC 7541 sizes)."""
    base = request_headers(ECHO)
    filler = total - header_list_size(base) - len("x-filler") - 32
    assert filler >= len(secret)
    return base + [("x-filler", secret + "f" * (filler - len(secret)))]


def test_headers_over_the_limit_are_resource_exhausted_without_echoing_them(peer) -> None:
    headers = padded_headers(HEADER_LIMIT + 1, secret="TOPSECRET")
    peer.send(peer.request(1, headers=headers))
    response = peer.response(1)
    assert_trailers_only(response, GRPC_RESOURCE_EXHAUSTED)
    assert response.grpc_message == (
        f"request headers of {HEADER_LIMIT + 1} bytes exceed the limit of {HEADER_LIMIT} bytes "
        "(H2_MAX_HEADER_LIST_SIZE)"
    )
    everything = repr(response.headers) + repr(response.trailers)
    assert "TOPSECRET" not in everything and "x-filler" not in everything
    peer.send(peer.request(3, body=b"after"))
    assert peer.response(3).message == b"after"


def test_a_client_that_keeps_sending_oversized_headers_runs_out_of_its_reset_budget(server_with) -> None:
    """Each refusal costs the server a header decode: past H2_MAX_RESETS (200 per window) of them the
    connection is told ENHANCE_YOUR_CALM instead of being answered for ever. (A server of its own:
    the offence puts this address on probation.)"""
    server = server_with(H2_MAX_HEADER_LIST_SIZE=HEADER_LIMIT, H2_MAX_MESSAGE_SIZE=MESSAGE_LIMIT)
    peer = Peer(server.port)
    try:
        headers = padded_headers(HEADER_LIMIT + 1)
        peer.try_send(*[peer.request(1 + 2 * i, headers=headers) for i in range(300)])
        peer.expect_goaway(ENHANCE_YOUR_CALM, b"too_many_resets")
    finally:
        peer.close()


def test_headers_of_exactly_the_limit_are_served(peer) -> None:
    peer.send(peer.request(1, headers=padded_headers(HEADER_LIMIT), body=b"at-limit"))
    assert peer.response(1).message == b"at-limit"


def test_many_small_headers_over_the_limit_are_resource_exhausted(peer) -> None:
    headers = request_headers(ECHO) + [(f"x-m{index}", "v") for index in range(500)]
    peer.send(peer.request(1, headers=headers))
    assert_trailers_only(peer.response(1), GRPC_RESOURCE_EXHAUSTED)


@pytest.fixture(scope="module")
def small_messages():
    from .harness import ServerThread

    running = ServerThread({"H2_MAX_MESSAGE_SIZE": str(MESSAGE_LIMIT)}).start()
    yield running
    running.stop()


@pytest.fixture
def small(small_messages):
    client = Peer(small_messages.port)
    yield client
    client.close()


def test_body_over_the_message_limit_is_resource_exhausted(small) -> None:
    small.send(small.request(1, body=b"m" * (MESSAGE_LIMIT + 1)))
    response = small.response(1)
    assert_trailers_only(response, GRPC_RESOURCE_EXHAUSTED)
    assert "H2_MAX_MESSAGE_SIZE" in response.grpc_message and str(MESSAGE_LIMIT) in response.grpc_message
    small.send(small.request(3, body=b"after"))
    assert small.response(3).message == b"after"


def test_body_of_exactly_the_message_limit_is_served(small) -> None:
    small.send(small.request(1, body=b"m" * MESSAGE_LIMIT))
    assert small.response(1).message == b"m" * MESSAGE_LIMIT


def test_compressed_message_inflating_past_the_limit_is_resource_exhausted(small) -> None:
    bomb = gzip.compress(b"\0" * (MESSAGE_LIMIT * 64))
    headers = request_headers(ECHO, extra=[("grpc-encoding", "gzip")])
    small.send(small.headers_frame(1, headers), data(1, grpc_message(bomb, compressed=True)))
    response = small.response(1)
    assert_trailers_only(response, GRPC_RESOURCE_EXHAUSTED)
    assert "H2_MAX_MESSAGE_SIZE" in response.grpc_message


def test_compressed_message_within_the_limit_is_decompressed(small) -> None:
    headers = request_headers(ECHO, extra=[("grpc-encoding", "gzip")])
    small.send(small.headers_frame(1, headers), data(1, grpc_message(gzip.compress(b"z" * 1000), compressed=True)))
    assert small.response(1).message == b"z" * 1000


def test_method_other_than_post_is_unimplemented(peer) -> None:
    peer.send(peer.request(1, headers=request_headers(ECHO, pseudo_method="GET")))
    assert_trailers_only(peer.response(1), GRPC_UNIMPLEMENTED)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/grpcx", None])
def test_content_type_not_grpc_is_internal(peer, content_type) -> None:
    peer.send(peer.request(1, headers=request_headers(ECHO, content_type=content_type)))
    assert_trailers_only(peer.response(1), GRPC_INTERNAL)


def test_unknown_method_is_unimplemented_naming_the_path(peer) -> None:
    peer.send(peer.request(1, path="/no.Such/Method"))
    response = peer.response(1)
    assert_trailers_only(response, GRPC_UNIMPLEMENTED)
    assert response.grpc_message == "Method not found: /no.Such/Method"


def test_unknown_method_message_cuts_the_path_to_200_characters(peer) -> None:
    path = "/x." + "p" * 600 + "/M"
    peer.send(peer.request(1, path=path))
    response = peer.response(1)
    assert_trailers_only(response, GRPC_UNIMPLEMENTED)
    assert response.grpc_message in ("Method not found: " + path[:200], "Method not found: " + path[:200] + "...")


@pytest.mark.parametrize("encoding", ["br", "snappy", "GZIP"])
def test_unreadable_grpc_encoding_is_unimplemented(peer, encoding: str) -> None:
    headers = request_headers(ECHO, extra=[("grpc-encoding", encoding)])
    peer.send(peer.headers_frame(1, headers), data(1, grpc_message(b"x", compressed=True)))
    assert_trailers_only(peer.response(1), GRPC_UNIMPLEMENTED)


@pytest.mark.parametrize("timeout", ["", "1x", "123456789S", "-1S", "S", "1.5S", "10 S"])
def test_malformed_grpc_timeout_is_internal(peer, timeout: str) -> None:
    peer.send(peer.request(1, headers=request_headers(ECHO, grpc_timeout=timeout)))
    assert_trailers_only(peer.response(1), GRPC_INTERNAL)


def test_malformed_binary_metadata_is_internal(peer) -> None:
    peer.send(peer.request(1, headers=request_headers(ECHO, extra=[("x-trace-bin", "!!not base64!!")])))
    assert_trailers_only(peer.response(1), GRPC_INTERNAL)


def test_expired_grpc_timeout_is_deadline_exceeded(server, peer) -> None:
    server.handlers.cancelled.clear()
    peer.send(peer.request(1, SLOW, b"30", headers=request_headers(SLOW, grpc_timeout="100m")))
    assert_trailers_only(peer.response(1), GRPC_DEADLINE_EXCEEDED)
    assert server.handlers.cancelled.wait(2)


def test_compressed_flag_without_an_encoding_is_internal(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, grpc_message(b"x", compressed=True)))
    assert_trailers_only(peer.response(1), GRPC_INTERNAL)


@pytest.mark.parametrize(
    "body",
    [b"", b"\0\0\0", grpc_message(b"a") + grpc_message(b"b"), b"\0\0\0\0\x09short"],
    ids=["empty", "short-prefix", "two-messages", "truncated"],
)
def test_body_that_is_not_one_message_is_internal(peer, body: bytes) -> None:
    peer.send(peer.headers_frame(1, request_headers(ECHO)), data(1, body))
    assert_trailers_only(peer.response(1), GRPC_INTERNAL)

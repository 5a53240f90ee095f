"""HTTP/2's rules for request header fields (RFC 9113 section 8): a malformed request is a
stream error PROTOCOL_ERROR; the connection goes on. The requests are composed by `h2` itself
with its validation turned off."""

from __future__ import annotations

import pytest

from .harness import (
    ECHO,
    PROTOCOL_ERROR,
    SLOW,
    data,
    grpc_message,
    request_headers,
)

STANDARD = request_headers(ECHO)


def reorder(headers, name: str, to_end: bool = True):
    moved = [field for field in headers if field[0] == name]
    rest = [field for field in headers if field[0] != name]
    return rest + moved if to_end else moved + rest


MALFORMED = {
    "upper-case-name": STANDARD + [("X-Upper", "1")],
    "upper-case-pseudo-value-ok-name-bad": STANDARD + [("Content-Length", "5")],
    "pseudo-after-regular": reorder(STANDARD, ":authority"),
    "unknown-pseudo": STANDARD[:4] + [(":foo", "bar")] + STANDARD[4:],
    "duplicated-path": STANDARD[:4] + [(":path", ECHO)] + STANDARD[4:],
    "duplicated-method": STANDARD[:4] + [(":method", "POST")] + STANDARD[4:],
    "duplicated-scheme": STANDARD[:4] + [(":scheme", "http")] + STANDARD[4:],
    "response-pseudo-status": STANDARD[:4] + [(":status", "200")] + STANDARD[4:],
    "connection": STANDARD + [("connection", "keep-alive")],
    "keep-alive": STANDARD + [("keep-alive", "timeout=5")],
    "proxy-connection": STANDARD + [("proxy-connection", "keep-alive")],
    "transfer-encoding": STANDARD + [("transfer-encoding", "chunked")],
    "upgrade": STANDARD + [("upgrade", "h2c")],
    "te-gzip": request_headers(ECHO, te="gzip"),
    "te-trailers-and-more": request_headers(ECHO, te="trailers, deflate"),
    "missing-method": request_headers(ECHO, pseudo_method=None),
    "missing-scheme": request_headers(ECHO, pseudo_scheme=None),
    "missing-path": request_headers(ECHO, pseudo_path=None),
    "empty-method": request_headers(ECHO, pseudo_method=""),
    "empty-scheme": request_headers(ECHO, pseudo_scheme=""),
    "empty-path": request_headers(ECHO, pseudo_path=""),
}


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_headers_are_a_stream_error(peer, headers) -> None:
    peer.send(peer.h2_request(1, headers))
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_the_connection_serves_the_next_request_after_a_malformed_one(peer) -> None:
    peer.send(peer.h2_request(1, STANDARD + [("connection", "close")]))
    peer.expect_rst(1, PROTOCOL_ERROR)
    peer.send(peer.h2_request(3, STANDARD, b"next"))
    assert peer.response(3).message == b"next"


def test_pseudo_header_in_trailers_is_a_stream_error(peer) -> None:
    peer.send(
        peer.headers_frame(1, STANDARD),
        data(1, grpc_message(b"x"), end_stream=False),
        peer.headers_frame(1, [(":path", ECHO)], end_stream=True),
    )
    peer.expect_rst(1, PROTOCOL_ERROR)


def test_second_headers_without_end_stream_is_a_stream_error(peer) -> None:
    peer.send(peer.headers_frame(1, request_headers(SLOW)), peer.headers_frame(1, [("x-more", "1")]))
    peer.expect_rst(1, PROTOCOL_ERROR)


VALID = {
    "te-trailers": STANDARD,
    "no-authority": request_headers(ECHO, pseudo_authority=None),
    "no-te": request_headers(ECHO, te=None),
    "repeated-metadata": STANDARD + [("x-tag", "a"), ("x-tag", "b")],
    "grpc-content-subtype": request_headers(ECHO, content_type="application/grpc+proto"),
    "user-agent-and-accept-encoding": STANDARD + [("user-agent", "grpc-c/1"), ("grpc-accept-encoding", "gzip")],
}


@pytest.mark.parametrize("headers", VALID.values(), ids=VALID.keys())
def test_well_formed_requests_are_served(peer, headers) -> None:
    peer.send(peer.h2_request(1, headers, b"fine"))
    response = peer.response(1)
    assert response.grpc_status == 0 and response.message == b"fine"


def test_trailers_with_end_stream_are_accepted(peer) -> None:
    peer.send(
        peer.headers_frame(1, STANDARD),
        data(1, grpc_message(b"t"), end_stream=False),
        peer.headers_frame(1, [("x-trailer", "1")], end_stream=True),
    )
    assert peer.response(1).message == b"t"

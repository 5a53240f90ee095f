"""A conforming client end to end: `h2` with its own validation on, fed everything the server
sends, acknowledging what it receives. The server's answers must satisfy a strict peer."""

from __future__ import annotations

import socket
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived

from .harness import BIG, ECHO, WAIT_S, grpc_message, request_headers


class StrictClient:
    def __init__(self, port: int, window: int = 65_535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({4: window})
        self.sock.sendall(self.conn.data_to_send())
        self.replies: dict[int, dict] = {}

    def call(self, path: str, body: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, request_headers(path))
        self.conn.send_data(stream_id, grpc_message(body), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.replies[stream_id] = {"data": b"", "done": False}
        return stream_id

    def run_until_done(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(reply["done"] for reply in self.replies.values()):
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = self.sock.recv(1 << 20)
            assert chunk, "the server closed the connection"
            for event in self.conn.receive_data(chunk):
                if isinstance(event, DataReceived):
                    self.replies[event.stream_id]["data"] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ResponseReceived | TrailersReceived):
                    self.replies[event.stream_id].setdefault("headers", []).extend(event.headers)
                elif isinstance(event, StreamEnded):
                    self.replies[event.stream_id]["done"] = True
                elif isinstance(event, StreamReset):
                    raise AssertionError(f"stream {event.stream_id} reset: {event.error_code}")
            self.sock.sendall(self.conn.data_to_send())
            assert time.monotonic() < deadline, "replies did not complete in time"

    def close(self) -> None:
        self.sock.close()


def test_strict_client_echo(server) -> None:
    client = StrictClient(server.port)
    try:
        stream = client.call(ECHO, b"strict")
        client.run_until_done()
        assert client.replies[stream]["data"] == grpc_message(b"strict")
        assert ("grpc-status", "0") in client.replies[stream]["headers"]
    finally:
        client.close()


def test_strict_client_large_replies_through_small_windows(server) -> None:
    client = StrictClient(server.port, window=16_384)
    try:
        streams = [client.call(BIG, b"%d" % (300_000 + i)) for i in range(5)]
        client.run_until_done()
        for index, stream in enumerate(streams):
            assert client.replies[stream]["data"] == grpc_message(b"x" * (300_000 + index))
    finally:
        client.close()


def test_strict_client_many_concurrent_calls(server) -> None:
    client = StrictClient(server.port)
    try:
        streams = {client.call(ECHO, b"c%d" % i): i for i in range(90)}
        client.run_until_done()
        for stream, index in streams.items():
            assert client.replies[stream]["data"] == grpc_message(b"c%d" % index)
    finally:
        client.close()

"""The side port serves many connections without a thread each, closes idle and slow ones, and caps them."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from mishards.observability.http import ObservabilityServer, bind_socket
from mishards.observability.metrics import Metrics
from tests.support.processes import LOCALHOST

IDLE_TIMEOUT = 1.0
MAX_CONNECTIONS = 64


class _ReadySource:
    """What /readyz and the pages read; only readiness is used by these tests."""

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"

    def snapshot(self) -> dict:
        raise AssertionError("not asked for here")


class _Served:
    """An ObservabilityServer on its own event loop thread, as the proxy runs it."""

    def __init__(self) -> None:
        self.server = ObservabilityServer(
            Metrics(), _ReadySource(), idle_timeout=IDLE_TIMEOUT, max_connections=MAX_CONNECTIONS
        )
        self.sock = bind_socket(LOCALHOST, 0)
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start(self.sock))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="side-port-under-test", daemon=True)
        self.thread.start()
        assert started.wait(10)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served():
    s = _Served()
    yield s
    s.close()


def _wait_all_closed(sockets: list[socket.socket], timeout_s: float) -> int:
    """Read every socket until EOF (or reset); the number still open when the time is up."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_count = len(sockets)
    deadline = time.monotonic() + timeout_s
    while open_count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            try:
                data = key.fileobj.recv(65536)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(key.fileobj)
                open_count -= 1
    selector.close()
    return open_count


@pytest.mark.timeout(120)
def test_a_thousand_idle_connections_cost_no_threads_and_are_closed(served: _Served):
    threads_before = threading.active_count()
    sockets = []
    try:
        for _ in range(1000):
            sockets.append(socket.create_connection((LOCALHOST, served.port), timeout=5))
        server = served.server
        deadline = time.monotonic() + 20
        while server.served_connections + server.refused_connections < 1000 and time.monotonic() < deadline:
            assert server.open_connections <= MAX_CONNECTIONS
            time.sleep(0.05)
        assert server.served_connections + server.refused_connections == 1000, "every connection was accepted"
        assert threading.active_count() - threads_before <= 2, "no thread per connection"
        assert server.open_connections <= MAX_CONNECTIONS
        assert server.refused_connections > 0, "the cap was reached and the excess closed at accept"
        started = time.monotonic()
        still_open = _wait_all_closed(sockets, timeout_s=IDLE_TIMEOUT + 10)
        assert still_open == 0, f"{still_open} idle connections were never closed"
        assert time.monotonic() - started < IDLE_TIMEOUT + 5
        assert served.server.open_connections == 0
        assert served.get("/healthz") == (200, "ok\n"), "the port serves again after the flood"
    finally:
        for sock in sockets:
            sock.close()


def test_a_slow_request_head_is_cut_off(served: _Served):
    with socket.create_connection((LOCALHOST, served.port), timeout=5) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        started = time.monotonic()
        sock.settimeout(IDLE_TIMEOUT + 5)
        assert sock.recv(100) == b""
        assert IDLE_TIMEOUT * 0.8 <= time.monotonic() - started < IDLE_TIMEOUT + 3


def test_keep_alive_then_idle_close_and_bad_requests(served: _Served):
    with socket.create_connection((LOCALHOST, served.port), timeout=5) as sock:
        for _ in range(3):  # three requests on one connection
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nok\n")
            assert b"Connection: keep-alive" in reply
        sock.settimeout(IDLE_TIMEOUT + 5)
        assert sock.recv(100) == b"", "closed once idle"
    with socket.create_connection((LOCALHOST, served.port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection((LOCALHOST, served.port), timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
    assert served.get("/nothing-here")[0] == 404

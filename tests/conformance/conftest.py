"""Fixtures of the conformance suite: one shared server with the default limits, peers, and
servers with chosen limits (small timeouts and sizes) for the cases that need them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .harness import Peer, ServerThread

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """The server with the contract's defaults, shared by the cases (budgets are per connection), but
    without probation: a case that ends a connection for abuse must not slow the cases after it on
    the same address (probation has cases of its own, on servers of their own)."""
    running = ServerThread({"H2_ABUSE_PROBATION": "0"}).start()
    yield running
    running.stop()


@pytest.fixture
def peer(server: ServerThread) -> Iterator[Peer]:
    """A client that finished the handshake with the default server."""
    client = Peer(server.port)
    yield client
    client.close()


@pytest.fixture
def server_with() -> Iterator[Callable[..., ServerThread]]:
    """Start a server with the given limits (env names of docs/front-door.md); stopped after the case."""
    started: list[ServerThread] = []

    def start(**limits: str) -> ServerThread:
        running = ServerThread({name: str(value) for name, value in limits.items()}).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()

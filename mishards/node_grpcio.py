"""The node-call port (`nodes.NodePort`) over grpcio's asyncio channel.

It carries the writable node's forwarded calls (inserts of hundreds of MB, index builds, ...:
everything but the search path's methods), and every call when RPC_TRANSPORT=grpcio. grpcio's
exceptions end here: a call that brings no reply fails with the port's own error family
(`utils.errors.NodeCallError`), exactly as over the proxy's own HTTP/2 client.
"""

from __future__ import annotations

import asyncio

import grpc

from utils.errors import node_call_error

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # a restarted node is reachable again within ~1 s, not after gRPC's default 120 s backoff cap
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
]
# A node that leaves keeps its channel until its in-flight calls end (each has a deadline, so this
# is only an upper bound): closing at once would cancel them and leave their searches hanging.
DRAIN_GRACE_S = 600.0


class GrpcioChannel:
    """Unary calls to one node over one grpc.aio channel, opened on first use (on the calling loop)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def call(self, path: str, request: bytes, timeout: float | None, metadata=None) -> asyncio.Future[bytes]:
        callable_ = self._callables.get(path)
        if callable_ is None:
            if self._channel is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            callable_ = self._callables[path] = self._channel.unary_unary(path)
        return asyncio.ensure_future(_translated(callable_(request, timeout=timeout, metadata=metadata)))

    def close(self) -> None:
        """Close once the calls in flight have ended; call on the loop that used it."""
        channel, self._channel = self._channel, None
        self._callables = {}
        if channel is not None:
            asyncio.ensure_future(channel.close(grace=DRAIN_GRACE_S))


async def _translated(call) -> bytes:
    try:
        return await call
    except grpc.RpcError as exc:
        raise node_call_error(exc.code().value[0], exc.details() or "") from exc
    except asyncio.CancelledError:
        call.cancel()
        raise

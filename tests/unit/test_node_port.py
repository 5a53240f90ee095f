"""The node-call port (nodes.NodePort) over real sockets: one connection per node, health checks
included, and one error family whichever client carried the call."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from milvus_grpc import milvus_pb2 as pb
from mishards.nodes import (
    NodeCallError,
    NodeClient,
    NodeRejectedRequest,
    NodeUnavailable,
    NodeUnimplemented,
)
from tests.unit.test_transport_interop import GRPC_OPTIONS, free_port, h2_serving
from utils.milvus_schema import SERVICE

VERSION = pb.StringReply(string_reply="0.9.1").SerializeToString()


async def _version(request: bytes, context) -> bytes:
    return VERSION


async def _echo(request: bytes, context) -> bytes:
    return request


@contextlib.asynccontextmanager
async def milvus_grpc_aio(**handlers):
    """A grpc.aio server speaking the Milvus service with raw-bytes handlers {method: async fn}."""
    generic = grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()}
    )
    server = grpc.aio.server(handlers=[generic], options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await asyncio.wait_for(server.stop(0), 5)


def test_health_checks_use_the_connection_of_the_searches():
    """Before: a blocking grpcio channel for probes, grpc.aio and the own client for calls, so up to
    three connections per node. Now the check is handed to the serving loop, over the one port."""

    async def main():
        handlers = {f"/{SERVICE}/SearchInFiles": _echo, f"/{SERVICE}/Cmd": _version}
        async with h2_serving(handlers) as (server, port):
            client = NodeClient("ro", f"127.0.0.1:{port}")
            client.attach(asyncio.get_running_loop())
            assert await client.call("SearchInFiles", b"q", 5) == b"q"
            assert len(server.connections) == 1
            for _ in range(3):  # as the probe thread does
                assert await asyncio.to_thread(client.handshake, 2.0) == "0.9.1"
            assert len(server.connections) == 1
            assert client.stats.version == "0.9.1"
            await asyncio.to_thread(client.close)

    asyncio.run(main())


def test_a_check_before_the_serving_loop_runs_uses_a_connection_it_closes():
    async def main():
        async with h2_serving({f"/{SERVICE}/Cmd": _version}) as (server, port):
            client = NodeClient("ro", f"127.0.0.1:{port}")  # no loop attached: start-up
            assert await asyncio.to_thread(client.handshake, 2.0) == "0.9.1"
            deadline = time.monotonic() + 5
            while server.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not server.connections

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_one_error_family_whichever_client_carried_the_call(transport):
    async def rejects(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")

    async def main():
        async with milvus_grpc_aio(Cmd=_version, Insert=rejects) as port:
            client = NodeClient("wo", f"127.0.0.1:{port}", fast_transport=transport == "http2")
            assert await client.call("Cmd", b"", 5) == VERSION
            with pytest.raises(NodeUnimplemented):
                await client.call("ReloadSegments", b"", 5)
            with pytest.raises(NodeRejectedRequest):  # the node could not parse it: the client's bad input
                await client.call("Insert", b"\xff", 5)
            client.close()
            await asyncio.sleep(0.05)
        gone = NodeClient("gone", f"127.0.0.1:{free_port()}", fast_transport=transport == "http2")
        with pytest.raises(NodeUnavailable) as caught:
            await gone.call("SearchInFiles", b"q", 5)
        assert isinstance(caught.value, NodeCallError) and str(caught.value).startswith("UNAVAILABLE")
        gone.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())

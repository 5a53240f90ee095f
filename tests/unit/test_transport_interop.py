"""Interoperability of `mishards.protocol.server` (H2Server, H2Channel) with the real grpcio library.

Everything runs over loopback on free ports. grpcio is used with raw-bytes generic handlers and
multi-callables without (de)serializers, so both sides move exactly the bytes the test chose.
Each test drives its own event loop with `asyncio.run` (pytest-asyncio is not installed) and
every wait is bounded; grpcio servers that must be killed or stopped (SIGKILL, SIGSTOP) run in a
subprocess that is always killed in a `finally`.

Some tests are regression tests for interop bugs found while writing this file (named in their
docstrings); two of them reproduce load-dependent races deterministically, without grpcio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from mishards.protocol.client import H2Channel
from mishards.protocol.http2 import Limits
from mishards.protocol.server import H2Server
from utils.errors import NodeCallError

pytestmark = pytest.mark.timeout(60)

SERVICE = "interop.Test"
ECHO = f"/{SERVICE}/Echo"
SLOW = f"/{SERVICE}/Slow"  # sleeps float(request) seconds (5 when empty), then answers b"slept"
CONTEXT = f"/{SERVICE}/Context"
BOOM = f"/{SERVICE}/Boom"
ABORT = f"/{SERVICE}/Abort"  # grpcio only: aborts with NOT_FOUND and the request as details
BIG_REPLY = f"/{SERVICE}/BigReply"

BIG = 20 * 1024 * 1024
BIG_PAYLOAD = os.urandom(BIG)
PAYLOADS = [b"", b"\x00", os.urandom(100 * 1024), BIG_PAYLOAD]
SMALL = [b"call-%d-" % i + bytes([i % 256]) * (i % 50) for i in range(200)]
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# What a call in flight may end with when its server goes away (never a hang, never OK).
SERVER_GONE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


# ====================================================================== helpers
class Handlers:
    """Raw-bytes handlers recording what they saw; create inside the running loop."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.contexts: list[tuple[float | None, tuple, str]] = []

    async def echo(self, request: bytes, context) -> bytes:
        return request

    async def slow(self, request: bytes, context) -> bytes:
        self.started.set()
        try:
            await asyncio.sleep(float(request or b"5"))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"slept"

    async def context(self, request: bytes, context) -> bytes:
        self.contexts.append((context.time_remaining(), tuple(context.invocation_metadata()), context.peer()))
        return b"ok"

    async def boom(self, request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    async def big_reply(self, request: bytes, context) -> bytes:
        self.started.set()
        await asyncio.sleep(float(request or b"0"))
        return BIG_PAYLOAD

    def h2(self) -> dict:
        return {
            ECHO: self.echo,
            SLOW: self.slow,
            CONTEXT: self.context,
            BOOM: self.boom,
            BIG_REPLY: self.big_reply,
        }


@contextlib.asynccontextmanager
async def h2_serving(handlers: dict, host: str = "127.0.0.1"):
    server = H2Server(handlers)
    port = await server.start(host, 0)
    try:
        yield server, port
    finally:
        await asyncio.wait_for(server.stop(0), 5)


@contextlib.asynccontextmanager
async def grpc_aio_serving(port: int = 0, **handlers):
    """A grpc.aio server on 127.0.0.1 with raw-bytes handlers {method name: async fn}."""
    generic = grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()}
    )
    server = grpc.aio.server(handlers=[generic], options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"cannot bind 127.0.0.1:{port}"
    await server.start()
    try:
        yield server, bound
    finally:
        await asyncio.wait_for(server.stop(0), 5)


def aio_channel(port: int, host: str = "127.0.0.1") -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"{host}:{port}", options=GRPC_OPTIONS)


def sync_calls(port: int, path: str, requests: list[bytes], timeout: float = 30, metadata=None) -> list:
    """All requests in flight at once on one sync grpc channel; replies, or the codes of failures."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        method = channel.unary_unary(path)
        pending = [method.future(request, timeout=timeout, metadata=metadata) for request in requests]
        results = []
        for call in pending:
            try:
                results.append(call.result())
            except grpc.RpcError as exc:
                results.append(exc.code())
        return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def fails_with(awaitable, timeout: float = 10) -> tuple[grpc.StatusCode, str, float]:
    """The code and details of the error `awaitable` raises (the node-call port's NodeCallError for
    our client, AioRpcError for grpcio's), and how long that took."""
    start = time.monotonic()
    with pytest.raises((NodeCallError, grpc.aio.AioRpcError)) as info:
        await asyncio.wait_for(awaitable, timeout)
    if isinstance(info.value, NodeCallError):
        return status_code(info.value), info.value.details, time.monotonic() - start
    return info.value.code(), info.value.details(), time.monotonic() - start


def status_code(error: NodeCallError) -> grpc.StatusCode:
    """The gRPC status a NodeCallError carries, as grpcio names it."""
    return next(code for code in grpc.StatusCode if code.value[0] == error.code)


async def until_ok(call, request: bytes, within: float) -> float:
    """Retry `call` until it succeeds (bounded); the seconds that took."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < within:
        try:
            assert await call(request, timeout=1) == request
            return time.monotonic() - start
        except (NodeCallError, grpc.aio.AioRpcError) as exc:
            last = exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"no successful call within {within} s; last error {last!r}")


def h2_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of the complete HTTP/2 frames in `data`."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        frames.append((data[3], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def read_until_eof(port: int, send: bytes, within: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; what came back and whether the server closed the connection in time."""
    received = b""
    deadline = time.monotonic() + within
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        sock.sendall(send)
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


SERVER_SCRIPT = r"""
import sys, time
from concurrent import futures
import grpc

def echo(request, context):
    return request

def slow(request, context):
    time.sleep(float(request or b"5"))
    return b"slept"

handler = grpc.method_handlers_generic_handler("interop.Test", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler],
                     options=[("grpc.so_reuseport", 0)])
port = server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def sigstop(proc: subprocess.Popen) -> None:
    """SIGSTOP, and wait (bounded) until every thread of the process is stopped: delivery is asynchronous."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/task/{task}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
        if states and all(state in "tT" for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {proc.pid} did not stop within 5 s")


@contextlib.contextmanager
def grpc_subprocess(port: int = 0):
    """A sync grpcio server (Echo, Slow) in a child process; (process, port). Always killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the grpcio server subprocess did not start within 20 s"
        bound = int(proc.stdout.readline() or 0)
        assert bound, f"the grpcio server subprocess could not bind port {port}"
        yield proc, bound
    finally:
        proc.kill()  # also ends a SIGSTOPped process
        proc.wait(10)
        proc.stdout.close()


# ====================================================================== server side: grpcio clients -> H2Server
def test_server_echo_with_sync_grpc_client():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port):
            assert await asyncio.to_thread(sync_calls, port, ECHO, PAYLOADS) == PAYLOADS
            assert await asyncio.to_thread(sync_calls, port, ECHO, SMALL) == SMALL
            # a 20 MB call interleaved with many small ones on one connection
            mixed = SMALL[:50] + [BIG_PAYLOAD] + SMALL[50:]
            assert await asyncio.to_thread(sync_calls, port, ECHO, mixed) == mixed

    asyncio.run(main())


def test_server_echo_with_aio_grpc_client():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            echo = channel.unary_unary(ECHO)
            for payload in PAYLOADS:
                assert await echo(payload, timeout=30) == payload
            assert await asyncio.gather(*(echo(m, timeout=30) for m in SMALL)) == SMALL
            mixed = SMALL[:100] + [BIG_PAYLOAD] + SMALL[100:]
            assert await asyncio.gather(*(echo(m, timeout=30) for m in mixed)) == mixed

    asyncio.run(main())


def test_server_unknown_method_is_unimplemented():
    async def main():
        async with h2_serving(Handlers().h2()) as (_, port), aio_channel(port) as channel:
            code, details, _ = await fails_with(channel.unary_unary(f"/{SERVICE}/Nope")(b"x", timeout=5))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert "Nope" in details
            assert await channel.unary_unary(ECHO)(b"still", timeout=5) == b"still"
            assert await asyncio.to_thread(sync_calls, port, "/other.Svc/M", [b"x"]) == [grpc.StatusCode.UNIMPLEMENTED]

    asyncio.run(main())


def test_server_deadline_cancels_handler():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            code, _, elapsed = await fails_with(channel.unary_unary(SLOW)(b"5", timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 1.5
            await asyncio.wait_for(handlers.cancelled.wait(), 2)
            assert await channel.unary_unary(ECHO)(b"after", timeout=5) == b"after"
            # the sync client too
            handlers.cancelled.clear()
            codes = await asyncio.to_thread(sync_calls, port, SLOW, [b"5"], 0.3)
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED]
            await asyncio.wait_for(handlers.cancelled.wait(), 2)
            assert await channel.unary_unary(ECHO)(b"after", timeout=5) == b"after"

    asyncio.run(main())


def test_server_context_timeout_metadata_peer():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            method = channel.unary_unary(CONTEXT)
            await method(b"", timeout=5, metadata=(("x-trace-id", "abc"),))
            await method(b"")
            await asyncio.to_thread(sync_calls, port, CONTEXT, [b""], 7, (("x-trace-id", "def"),))
        (remaining, metadata, peer), (no_timeout, _, _), (sync_remaining, sync_metadata, sync_peer) = handlers.contexts
        # grpc-core rounds the grpc-timeout it sends up (to a coarser unit), hence the slack above
        assert 4.0 < remaining <= 5.1
        assert ("x-trace-id", "abc") in metadata
        assert peer.startswith("ipv4:127.0.0.1:")
        assert no_timeout is None
        assert 6.0 < sync_remaining <= 7.1
        assert ("x-trace-id", "def") in sync_metadata
        assert sync_peer.startswith("ipv4:127.0.0.1:")

    asyncio.run(main())


def test_server_handler_exception_is_internal():
    async def main():
        async with h2_serving(Handlers().h2()) as (_, port), aio_channel(port) as channel:
            code, details, _ = await fails_with(channel.unary_unary(BOOM)(b"", timeout=5))
            assert code == grpc.StatusCode.INTERNAL
            assert "RuntimeError" in details
            assert await asyncio.to_thread(sync_calls, port, BOOM, [b""]) == [grpc.StatusCode.INTERNAL]
            assert await channel.unary_unary(ECHO)(b"still", timeout=5) == b"still"

    asyncio.run(main())


def test_server_client_cancel_cancels_handler():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            call = channel.unary_unary(SLOW)(b"5", timeout=10)
            await asyncio.wait_for(handlers.started.wait(), 5)
            assert call.cancel()
            await asyncio.wait_for(handlers.cancelled.wait(), 2)
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await channel.unary_unary(ECHO)(b"still", timeout=5) == b"still"

    asyncio.run(main())


def test_server_stop_lets_inflight_call_finish_within_grace():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (server, port), aio_channel(port) as channel:
            call = channel.unary_unary(SLOW)(b"0.5", timeout=10)
            await asyncio.wait_for(handlers.started.wait(), 5)
            start = time.monotonic()
            stopping = asyncio.create_task(server.stop(3))
            assert await asyncio.wait_for(call, 5) == b"slept"
            await asyncio.wait_for(stopping, 5)
            assert time.monotonic() - start < 2.0  # returned when the call was done, not at the grace end
            assert not handlers.cancelled.is_set()
            assert await asyncio.to_thread(refused, port)
            async with aio_channel(port) as fresh:
                code, _, _ = await fails_with(fresh.unary_unary(ECHO)(b"x", timeout=2))
                assert code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_server_stop_cancels_calls_past_grace():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (server, port), aio_channel(port) as channel:
            call = channel.unary_unary(SLOW)(b"5", timeout=10)
            await asyncio.wait_for(handlers.started.wait(), 5)
            start = time.monotonic()
            await asyncio.wait_for(server.stop(0.3), 3)
            assert time.monotonic() - start < 1.5
            await asyncio.wait_for(handlers.cancelled.wait(), 1)
            code, _, _ = await fails_with(call, 3)
            assert code in SERVER_GONE_CODES
            assert await asyncio.to_thread(refused, port)

    asyncio.run(main())


def test_server_stop_delivers_large_reply_within_grace():
    """A 20 MB reply still waiting for the client's window when stop() begins is delivered whole."""

    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (server, port), aio_channel(port) as channel:
            call = channel.unary_unary(BIG_REPLY)(b"0.3", timeout=10)  # a fresh connection: small windows
            await asyncio.wait_for(handlers.started.wait(), 5)
            stopping = asyncio.create_task(server.stop(5))
            try:
                assert await asyncio.wait_for(call, 8) == BIG_PAYLOAD
            finally:
                await asyncio.wait_for(stopping, 8)

    asyncio.run(main())


def _raw_call_reading_after_stop_began(port: int, request_sent: threading.Event) -> str:
    """One BIG_REPLY call from a plain socket (framed by the project's sans-IO ClientConnection)
    that sends a PING once the server has begun closing, then reads the reply; what happened."""
    from mishards.protocol import http2
    from mishards.protocol.grpc_h2 import CallDone, CallFailed, ClientConnection

    connection = ClientConnection(f"127.0.0.1:{port}")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the reply waits in the server's buffers
        sock.connect(("127.0.0.1", port))
        sock.settimeout(5)
        connection.start_call(BIG_REPLY.encode(), b"0.3", None)
        sock.sendall(connection.data_to_send())
        request_sent.set()
        time.sleep(0.8)  # the handler has answered; its reply is queued, stop() is under way
        sock.sendall(http2.frame(http2.PING, 0, 0, b"interop!"))  # as grpcio's BDP pings / WINDOW_UPDATEs do
        received = 0
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return f"EOF after {received} bytes, without the reply"
                received += len(data)
                for event in connection.receive(data):
                    if isinstance(event, CallDone):
                        return f"reply of {len(event.message)} bytes"
                    if isinstance(event, CallFailed):
                        return f"call failed: {event}"
        except OSError as exc:
            return f"{exc!r} after {received} bytes"


def test_server_stop_does_not_reset_a_client_still_reading():
    """Regression: a draining H2Server used to close() its socket once the last reply was handed to
    asyncio and so stopped reading; frames still arriving (PING, WINDOW_UPDATE) made the kernel
    answer the close with a RST that destroyed the reply's unsent tail (grpcio under load:
    'recvmsg: Connection reset by peer')."""

    async def main():
        async with h2_serving(Handlers().h2()) as (server, port):
            request_sent = threading.Event()
            outcome = asyncio.ensure_future(asyncio.to_thread(_raw_call_reading_after_stop_began, port, request_sent))
            assert await asyncio.to_thread(request_sent.wait, 5)
            await asyncio.sleep(0.1)
            stopping = asyncio.create_task(server.stop(5))
            try:
                assert await asyncio.wait_for(outcome, 10) == f"reply of {BIG} bytes"
            finally:
                await asyncio.wait_for(stopping, 8)

    asyncio.run(main())


def test_server_binds_dual_stack_and_ipv4():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2(), host="[::]") as (_, port):
            async with aio_channel(port) as channel:
                assert await channel.unary_unary(ECHO)(b"v4", timeout=5) == b"v4"
                await channel.unary_unary(CONTEXT)(b"", timeout=5)
            assert handlers.contexts[-1][2].startswith("ipv4:127.0.0.1:")  # as grpcio names the peer
            if socket.has_ipv6 and _ipv6_loopback():
                async with aio_channel(port, "[::1]") as channel:
                    assert await channel.unary_unary(ECHO)(b"v6", timeout=5) == b"v6"
                    await channel.unary_unary(CONTEXT)(b"", timeout=5)
                assert handlers.contexts[-1][2].startswith("ipv6:%5B::1%5D:")
        async with h2_serving(handlers.h2(), host="127.0.0.1") as (_, port), aio_channel(port) as channel:
            assert await channel.unary_unary(ECHO)(b"v4 only", timeout=5) == b"v4 only"

    asyncio.run(main())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http1-short"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: interop-test\r\n\r\n", id="http1-long"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x01", id="bad-frame"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, id="tls-hello"),
    ],
)
def test_server_closes_garbage_connections_and_keeps_serving(garbage):
    async def main():
        async with h2_serving(Handlers().h2()) as (server, port), aio_channel(port) as channel:
            received, closed = await asyncio.to_thread(read_until_eof, port, garbage, 3.0)
            assert closed, f"the server kept a garbage connection open (got {received[:100]!r})"
            kinds = [kind for kind, _, _ in h2_frames(received)]
            assert 7 in kinds, f"no GOAWAY before the close: frame types {kinds}"  # 7 = GOAWAY
            assert await channel.unary_unary(ECHO)(b"still", timeout=5) == b"still"
            for _ in range(100):  # the garbage connection is forgotten
                if len(server.connections) == 1:
                    break
                await asyncio.sleep(0.02)
            assert len(server.connections) == 1

    asyncio.run(main())


def test_server_closes_connection_on_eof_mid_preface():
    async def main():
        async with h2_serving(Handlers().h2()) as (server, port):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"PRI * HT")
            for _ in range(100):
                if not server.connections:
                    break
                await asyncio.sleep(0.02)
            assert not server.connections

    asyncio.run(main())


def test_server_hpack_state_survives_many_distinct_metadata():
    """grpcio's request headers use its HPACK dynamic table (with evictions); all decode right."""

    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            method = channel.unary_unary(CONTEXT)
            sent = [(("x-id", str(i) * (1 + i % 300)), ("x-pad", f"p{i % 37:02d}" * (1 + i % 40))) for i in range(600)]
            await asyncio.gather(*(method(b"", timeout=10, metadata=m) for m in sent))
        received = sorted(
            tuple(kv for kv in metadata if kv[0] in ("x-id", "x-pad")) for _, metadata, _ in handlers.contexts
        )
        assert received == sorted(sent)

    asyncio.run(main())


def test_server_request_over_limit_is_resource_exhausted():
    async def main():
        server = H2Server(Handlers().h2(), Limits(max_message_size=1000))
        port = await server.start("127.0.0.1", 0)
        try:
            async with aio_channel(port) as channel:
                echo = channel.unary_unary(ECHO)
                assert await echo(b"a" * 1000, timeout=5) == b"a" * 1000
                for size in (1001, 5 * 1024 * 1024):
                    code, _, _ = await fails_with(echo(b"a" * size, timeout=5))
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await echo(b"after", timeout=5) == b"after"
        finally:
            await asyncio.wait_for(server.stop(0), 5)

    asyncio.run(main())


def test_server_serves_gzip_compressed_requests():
    async def main():
        async with h2_serving(Handlers().h2()) as (_, port):
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=GRPC_OPTIONS, compression=grpc.Compression.Gzip
            )
            async with channel:
                echo = channel.unary_unary(ECHO)
                for payload in (b"", b"a" * 100_000, PAYLOADS[2]):
                    assert await echo(payload, timeout=10) == payload

    asyncio.run(main())


def test_server_decompressed_request_over_limit_is_resource_exhausted():
    """As grpcio: a gzip request over max_receive once inflated is RESOURCE_EXHAUSTED (was INTERNAL)."""

    async def main():
        server = H2Server(Handlers().h2(), Limits(max_message_size=1000))
        port = await server.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip) as channel:
                echo = channel.unary_unary(ECHO)
                assert await echo(b"a" * 1000, timeout=5) == b"a" * 1000
                code, details, _ = await fails_with(echo(b"\0" * 100_000, timeout=5))  # ~100 bytes gzipped
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        finally:
            await asyncio.wait_for(server.stop(0), 5)

    asyncio.run(main())


def test_server_handler_returning_non_bytes_is_internal():
    """Regression: a non-bytes reply used to escape the task, leaving the call unanswered until its deadline."""

    async def main():
        async def returns_str(request, context):
            return "not bytes"

        async with h2_serving({ECHO: returns_str}) as (_, port), aio_channel(port) as channel:
            code, _, _ = await fails_with(channel.unary_unary(ECHO)(b"", timeout=1))
            assert code == grpc.StatusCode.INTERNAL

    asyncio.run(main())


# ====================================================================== client side: H2Channel -> grpcio servers
async def _echo(request, context):
    return request


async def _abort(request, context):
    await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())


def test_client_round_trips_with_aio_grpc_server():
    async def main():
        async with grpc_aio_serving(Echo=_echo) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            echo = channel.unary(ECHO)
            for payload in PAYLOADS:
                assert await echo(payload, timeout=30) == payload
            assert await asyncio.gather(*(echo(m, timeout=30) for m in SMALL)) == SMALL
            mixed = SMALL[:100] + [BIG_PAYLOAD] + SMALL[100:]
            assert await asyncio.gather(*(echo(m, timeout=30) for m in mixed)) == mixed
            channel.close()

    asyncio.run(main())


def test_client_round_trips_with_sync_grpc_server():
    async def main():
        generic = grpc.method_handlers_generic_handler(
            SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
        )
        executor = futures.ThreadPoolExecutor(max_workers=32)
        server = grpc.server(executor, handlers=[generic], options=GRPC_OPTIONS)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            channel = H2Channel(f"127.0.0.1:{port}")
            echo = channel.unary(ECHO)
            for payload in PAYLOADS:
                assert await echo(payload, timeout=30) == payload
            assert await asyncio.gather(*(echo(m, timeout=30) for m in SMALL)) == SMALL
            channel.close()
        finally:
            server.stop(0).wait(5)
            executor.shutdown(wait=False)

    asyncio.run(main())


@pytest.mark.parametrize(
    "details",
    ["nope", "naïve 100% done, %41 stays %41 — 日本語 ✓", "tab\tand newline\nand ~!@#$^&*()[]{}"],
)
def test_client_error_status_and_details(details):
    async def main():
        async with grpc_aio_serving(Abort=_abort) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            code, got, _ = await fails_with(channel.unary(ABORT)(details.encode(), timeout=5))
            assert code == grpc.StatusCode.NOT_FOUND
            assert got == details
            code, _, _ = await fails_with(channel.unary(f"/{SERVICE}/Nope")(b"", timeout=5))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            channel.close()

    asyncio.run(main())


def test_client_deadline_exceeded_and_server_sees_the_cancel():
    async def main():
        cancelled = asyncio.Event()

        async def slow(request, context):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b"slept"

        async with grpc_aio_serving(Slow=slow, Echo=_echo) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            assert await channel.unary(ECHO)(b"warm", timeout=5) == b"warm"
            code, _, elapsed = await fails_with(channel.unary(SLOW)(b"", timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 < elapsed < 1.3
            await asyncio.wait_for(cancelled.wait(), 2)  # the RST_STREAM reached grpcio
            # on a cold channel (the deadline also covers connecting)
            cold = H2Channel(f"127.0.0.1:{port}")
            code, _, elapsed = await fails_with(cold.unary(SLOW)(b"", timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 1.3
            assert await channel.unary(ECHO)(b"after", timeout=5) == b"after"
            channel.close()
            cold.close()

    asyncio.run(main())


def test_client_metadata_reaches_grpc_server():
    async def main():
        seen = []

        async def record(request, context):
            seen.append((tuple(context.invocation_metadata()), context.time_remaining()))
            return b"ok"

        async with grpc_aio_serving(Record=record) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            record_call = channel.unary(f"/{SERVICE}/Record")
            metadata = (("x-trace-id", "abc"), ("x-blob-bin", b"\x00\x01\xfe\xff"))
            assert await record_call(b"", timeout=5, metadata=metadata) == b"ok"
            # what the tracer hands over (grpc.aio.Metadata), and a caller's upper-case key
            assert await record_call(b"", timeout=5, metadata=grpc.aio.Metadata(("X-Span", "s1"))) == b"ok"
            channel.close()
        (received, remaining), (aio_metadata, _) = seen
        assert ("x-trace-id", "abc") in received
        assert ("x-blob-bin", b"\x00\x01\xfe\xff") in received
        assert 4.0 < remaining <= 5.0
        assert ("x-span", "s1") in aio_metadata

    asyncio.run(main())


def test_client_unavailable_then_reconnects_when_server_starts():
    async def main():
        port = free_port()
        channel = H2Channel(f"127.0.0.1:{port}")
        echo = channel.unary(ECHO)
        code, _, elapsed = await fails_with(echo(b"x", timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 1.0
        code, _, elapsed = await fails_with(echo(b"x", timeout=5))  # within the backoff: fails fast
        assert code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 1.0
        async with grpc_aio_serving(port, Echo=_echo):
            assert await until_ok(echo, b"back", within=3.0) < 2.5
        channel.close()

    asyncio.run(main())


def test_client_calls_fail_when_aio_server_stops_and_reconnect():
    async def main():
        started = asyncio.Event()

        async def slow(request, context):
            started.set()
            await asyncio.sleep(5)
            return b"slept"

        async with grpc_aio_serving(Slow=slow, Echo=_echo) as (server, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            slow_call = channel.unary(SLOW)
            inflight = [asyncio.ensure_future(slow_call(b"", timeout=10)) for _ in range(5)]
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.wait_for(server.stop(0), 5)
            for call in inflight:
                code, _, elapsed = await fails_with(call, 3)
                assert code in SERVER_GONE_CODES
        async with grpc_aio_serving(port, Echo=_echo):
            assert await until_ok(channel.unary(ECHO), b"again", within=3.0) < 2.5
        channel.close()

    asyncio.run(main())


def test_client_calls_fail_when_server_process_is_killed_and_reconnect():
    async def main():
        with grpc_subprocess() as (proc, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            echo, slow = channel.unary(ECHO), channel.unary(SLOW)
            assert await echo(b"warm", timeout=5) == b"warm"
            inflight = [asyncio.ensure_future(slow(b"5", timeout=10)) for _ in range(5)]
            await asyncio.sleep(0.3)
            proc.kill()
            for call in inflight:
                code, _, elapsed = await fails_with(call, 3)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert elapsed < 1.0
        with grpc_subprocess(port):
            assert await until_ok(echo, b"again", within=5.0) < 4.0
        channel.close()

    asyncio.run(main())


def test_client_stopped_server_deadline_then_recovers():
    async def main():
        with grpc_subprocess() as (proc, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            echo = channel.unary(ECHO)
            assert await echo(b"warm", timeout=5) == b"warm"
            sigstop(proc)
            try:
                code, _, elapsed = await fails_with(echo(b"x", timeout=0.5), 3)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert elapsed < 1.5
            finally:
                proc.send_signal(signal.SIGCONT)
            assert await until_ok(echo, b"again", within=5.0) < 4.0
            channel.close()

    asyncio.run(main())


def test_client_drops_half_open_connection_after_missed_ping():
    async def main():
        with grpc_subprocess() as (proc, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            echo = channel.unary(ECHO)
            assert await echo(b"warm", timeout=5) == b"warm"
            first = channel._protocol
            sigstop(proc)
            try:
                code, _, _ = await fails_with(echo(b"x", timeout=0.3), 3)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                for _ in range(60):  # PING_TIMEOUT_S (2 s) after the deadline, the connection is aborted
                    if first.lost:
                        break
                    await asyncio.sleep(0.05)
                assert first.lost
            finally:
                proc.send_signal(signal.SIGCONT)
            assert await until_ok(echo, b"again", within=5.0) < 4.0
            assert channel._protocol is not first
            channel.close()

    asyncio.run(main())


def test_client_close_fails_later_calls():
    async def main():
        async def slow(request, context):
            await asyncio.sleep(0.3)
            return b"slept"

        async with grpc_aio_serving(Slow=slow, Echo=_echo) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            assert await channel.unary(ECHO)(b"warm", timeout=5) == b"warm"
            inflight = asyncio.ensure_future(channel.unary(SLOW)(b"", timeout=5))
            await asyncio.sleep(0.05)
            channel.close()
            code, _, elapsed = await fails_with(channel.unary(ECHO)(b"x", timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert elapsed < 0.5
            assert await asyncio.wait_for(inflight, 5) == b"slept"  # calls already running end normally
            code, _, _ = await fails_with(channel.unary(ECHO)(b"x", timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
            never_used = H2Channel(f"127.0.0.1:{port}")
            never_used.close()
            code, _, _ = await fails_with(never_used.unary(ECHO)(b"x", timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_client_cancelled_caller_cancels_the_server_call():
    """Regression: cancelling the awaiter used to leave the stream open (no RST_STREAM) until the deadline."""

    async def main():
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def slow(request, context):
            started.set()
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b"slept"

        async with grpc_aio_serving(Slow=slow) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            task = asyncio.ensure_future(channel.unary(SLOW)(b"", timeout=4))
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            try:
                await asyncio.wait_for(cancelled.wait(), 2)
            finally:
                channel.close()

    asyncio.run(main())


def test_client_hpack_state_survives_many_distinct_trailers():
    """grpcio's trailers go through its HPACK dynamic table; 300 distinct details decode right."""

    async def abort_with_trailers(request, context):
        context.set_trailing_metadata((("x-echo", request.decode() * 2),))
        await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())

    async def main():
        async with grpc_aio_serving(Abort=abort_with_trailers) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            abort = channel.unary(ABORT)
            details = [f"detail-{i}-" + "x" * (i * 7 % 500) for i in range(300)]

            async def one(text: str) -> str:
                code, got, _ = await fails_with(abort(text.encode(), timeout=10))
                assert code == grpc.StatusCode.NOT_FOUND
                return got

            assert await asyncio.gather(*(one(d) for d in details)) == details
            channel.close()

    asyncio.run(main())


def test_client_request_over_grpc_server_limit_is_resource_exhausted():
    async def main():
        server = grpc.aio.server(  # grpcio's default 4 MiB receive limit
            handlers=[
                grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            # Several on one connection: the second used to be reset with PROTOCOL_ERROR now and
            # then (test_client_acks_settings_before_using_the_window_they_grant).
            channel = H2Channel(f"127.0.0.1:{port}")
            for _ in range(3):
                code, details, _ = await fails_with(channel.unary(ECHO)(BIG_PAYLOAD, timeout=10))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert await channel.unary(ECHO)(b"small", timeout=5) == b"small"
            channel.close()
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_client_graceful_grpc_server_stop():
    """grpc.aio's stop(grace): handlers already running finish; calls grpcio had not yet handed to
    a handler end CANCELLED (grpcio's own client sees the same). Nothing hangs."""

    async def main():
        started = asyncio.Event()

        async def slow(request, context):
            started.set()
            await asyncio.sleep(0.3)
            return b"slept"

        async with grpc_aio_serving(Slow=slow, Echo=_echo) as (server, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            assert await channel.unary(ECHO)(b"warm", timeout=5) == b"warm"
            inflight = [asyncio.ensure_future(channel.unary(SLOW)(b"", timeout=5)) for _ in range(5)]
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.wait_for(server.stop(3), 5)
            results = await asyncio.wait_for(asyncio.gather(*inflight, return_exceptions=True), 5)
            assert b"slept" in results
            for result in results:
                assert result == b"slept" or status_code(result) == grpc.StatusCode.CANCELLED, result
            code, _, _ = await fails_with(channel.unary(ECHO)(b"x", timeout=2))
            assert code == grpc.StatusCode.UNAVAILABLE
            channel.close()

    asyncio.run(main())


def test_client_reads_gzip_replies_of_a_compressing_grpc_server():
    """Regression: a grpcio server with compression gzips replies although the client sent no
    grpc-accept-encoding; they used to fail INTERNAL."""

    async def main():
        generic = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
        server = grpc.aio.server(handlers=[generic], compression=grpc.Compression.Gzip)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            channel = H2Channel(f"127.0.0.1:{port}")
            assert await channel.unary(ECHO)(b"a" * 10_000, timeout=5) == b"a" * 10_000
            channel.close()
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_client_acks_settings_before_using_the_window_they_grant():
    """Regression (sans-IO) for a race seen against grpcio: large requests intermittently failed
    INTERNAL 'stream reset by the server (HTTP/2 error 1)', because DATA sized by a just-raised
    INITIAL_WINDOW_SIZE went out before the SETTINGS ACK, and grpc-core enforces the acknowledged
    window."""
    import struct

    from mishards.protocol import http2
    from mishards.protocol.grpc_h2 import ClientConnection

    connection = ClientConnection("127.0.0.1:1")
    server_settings = http2.frame(http2.SETTINGS, 0, 0, struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 16_384))
    connection.receive(server_settings + http2.frame(http2.WINDOW_UPDATE, 0, 0, http2.UINT32.pack(10_000_000)))
    connection.data_to_send()
    connection.start_call(b"/a.B/C", b"x" * 100_000, None)
    first = h2_frames(connection.data_to_send())
    assert sum(len(payload) for kind, _, payload in first if kind == http2.DATA) == 16_384  # blocked now
    raised = http2.frame(http2.SETTINGS, 0, 0, struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 1_000_000))
    connection.receive(raised)
    out = connection.data_to_send()
    kinds = [(out[i + 3], out[i + 4]) for i in _frame_offsets(out)]
    assert (http2.DATA, 0) in kinds or (http2.DATA, http2.END_STREAM) in kinds  # the new window is used
    assert kinds[0] == (http2.SETTINGS, http2.ACK), f"ACK must precede the DATA it unblocks: {kinds}"


def _frame_offsets(data: bytes) -> list[int]:
    offsets, position = [], 0
    while position + 9 <= len(data):
        offsets.append(position)
        position += 9 + int.from_bytes(data[position : position + 3], "big")
    return offsets


# ====================================================================== both sides ours: H2Channel -> H2Server
def test_end_to_end_h2_channel_to_h2_server():
    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port):
            channel = H2Channel(f"127.0.0.1:{port}")
            echo = channel.unary(ECHO)
            assert await echo(BIG_PAYLOAD, timeout=30) == BIG_PAYLOAD
            assert await asyncio.gather(*(echo(m, timeout=10) for m in SMALL[:100])) == SMALL[:100]
            sent_metadata = (("x-trace-id", "abc"), ("x-blob-bin", b"\x00\x01\xfe\xff"))
            await channel.unary(CONTEXT)(b"", timeout=5, metadata=sent_metadata)
            remaining, metadata, peer = handlers.contexts[-1]
            assert 4.0 < remaining <= 5.0
            assert set(sent_metadata) <= set(metadata)
            assert peer.startswith("ipv4:127.0.0.1:")
            code, _, _ = await fails_with(channel.unary(BOOM)(b"", timeout=5))
            assert code == grpc.StatusCode.INTERNAL
            code, _, _ = await fails_with(channel.unary(f"/{SERVICE}/Nope")(b"", timeout=5))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            code, _, elapsed = await fails_with(channel.unary(SLOW)(b"5", timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 1.3
            await asyncio.wait_for(handlers.cancelled.wait(), 2)
            assert await echo(b"after", timeout=5) == b"after"
            channel.close()

    asyncio.run(main())


def test_server_decodes_binary_metadata():
    """Regression: '-bin' metadata used to reach handlers still base64-encoded (grpcio decodes it)."""

    async def main():
        handlers = Handlers()
        async with h2_serving(handlers.h2()) as (_, port), aio_channel(port) as channel:
            await channel.unary_unary(CONTEXT)(b"", timeout=5, metadata=(("x-blob-bin", b"\x00\x01\xfe\xff"),))
        assert ("x-blob-bin", b"\x00\x01\xfe\xff") in handlers.contexts[-1][1]

    asyncio.run(main())


def test_end_to_end_early_answer_does_not_leak_server_streams():
    """Regression: when the server answered before the whole request was sent, the client's RST_STREAM
    (NO_ERROR) was never sent, so H2Server kept each such stream open and, once MAX_STREAMS were
    stuck, refused every new call on the connection."""

    async def main():
        # 4 streams stand for the real 1024
        server = H2Server(Handlers().h2(), Limits(max_message_size=1000, max_concurrent_streams=4))
        port = await server.start("127.0.0.1", 0)
        channel = H2Channel(f"127.0.0.1:{port}")
        try:
            echo = channel.unary(ECHO)
            for _ in range(5):  # each over the limit, and larger than the 4 MiB stream window
                code, _, _ = await fails_with(echo(b"a" * (6 * 1024 * 1024), timeout=5))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await echo(b"small", timeout=5) == b"small"
        finally:
            channel.close()
            await asyncio.wait_for(server.stop(0), 5)

    asyncio.run(main())


def test_node_client_closes_its_http2_connection_when_the_node_leaves():
    """A read-only node only ever called on the search path still has its connection closed."""
    from mishards.nodes import NodeClient
    from utils.milvus_schema import SERVICE

    async def main():
        handlers = {f"/{SERVICE}/SearchInFiles": Handlers().echo}
        async with h2_serving(handlers) as (server, port):
            client = NodeClient("ro", f"127.0.0.1:{port}")
            assert await client.call("SearchInFiles", b"q", 5) == b"q"
            assert len(server.connections) == 1
            await asyncio.to_thread(client.close)  # discovery threads call it
            deadline = time.monotonic() + 5
            while server.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not server.connections
            with pytest.raises(NodeCallError) as caught:
                await client.call("SearchInFiles", b"q", 5)
            assert status_code(caught.value) == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())

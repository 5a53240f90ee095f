"""The proxy's own HTTP/2 client (`transport.H2Channel` over `core.grpc_h2.ClientConnection`)
against a scripted raw server: a node that breaks the protocol fails the call with a code and
gets the RFC's answer, never a hang."""

from __future__ import annotations

import asyncio
import struct

import grpc
import pytest

from mishards.protocol.client import H2Channel
from utils.errors import NodeCallError

from .harness import (
    CANCEL,
    DATA,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    WAIT_S,
    goaway,
    grpc_message,
    ping,
    raw_frame,
    rst_stream,
    settings_frame,
    window_update,
)

pytestmark = pytest.mark.timeout(30)

REPLY_HEADERS = b"\x88" + b"\x5f\x10application/grpc"  # :status 200, content-type (static index 31)


async def read_frames(reader: asyncio.StreamReader, until, timeout: float = WAIT_S) -> list[tuple]:
    """(type, flags, stream, payload) frames until `until(frame)` or EOF, bounded."""
    frames = []

    async def loop():
        while True:
            header = await reader.readexactly(9)
            length = int.from_bytes(header[:3], "big")
            payload = await reader.readexactly(length)
            frame = (header[3], header[4], struct.unpack(">I", header[5:9])[0] & 0x7FFFFFFF, payload)
            frames.append(frame)
            if until(frame):
                return

    try:
        await asyncio.wait_for(loop(), timeout)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        pass  # the peer hung up, or sent nothing more: what came is in `frames`
    return frames


async def run_scripted(answer: bytes, settings: bytes = settings_frame()) -> tuple[BaseException | bytes, list]:
    """One call through an H2Channel to a server that reads the request, then sends `answer`.
    The call's outcome, and the frames the client sent after the answer."""
    after: list = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            writer.write(settings + raw_frame(4, 1, 0))  # our SETTINGS and an ACK of theirs
            await read_frames(reader, lambda f: f[0] in (DATA, HEADERS) and f[1] & END_STREAM)
            writer.write(answer)
            await writer.drain()
            after.extend(await read_frames(reader, lambda f: f[0] in (GOAWAY, RST_STREAM)))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what it sent before is in `after`
        finally:
            done.set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = H2Channel(f"127.0.0.1:{port}")
    try:
        try:
            outcome: BaseException | bytes = await asyncio.wait_for(channel.unary("/s.S/M")(b"q", timeout=WAIT_S), 5)
        except NodeCallError as exc:
            outcome = exc
        await asyncio.wait_for(done.wait(), 5)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    return outcome, after


def run(answer: bytes, settings: bytes = settings_frame()):
    return asyncio.run(run_scripted(answer, settings))


def code_of(outcome) -> grpc.StatusCode:
    assert isinstance(outcome, NodeCallError), f"the call succeeded: {outcome!r}"
    return next(code for code in grpc.StatusCode if code.value[0] == outcome.code)


def sent(frames: list, kind: int) -> tuple | None:
    return next((f for f in frames if f[0] == kind), None)


def test_a_normal_reply_is_received() -> None:
    reply = raw_frame(HEADERS, END_HEADERS, 1, REPLY_HEADERS) + raw_frame(DATA, 0, 1, grpc_message(b"fine"))
    reply += raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x00\x0bgrpc-status\x010")
    outcome, _ = run(reply)
    assert outcome == b"fine"


def test_frame_above_our_max_frame_size_is_a_frame_size_error() -> None:
    reply = raw_frame(HEADERS, END_HEADERS, 1, REPLY_HEADERS) + raw_frame(DATA, 0, 1, grpc_message(b"f" * 20_000))
    outcome, after = run(reply)
    assert code_of(outcome) == grpc.StatusCode.UNAVAILABLE
    frame = sent(after, GOAWAY)
    assert frame is not None and struct.unpack(">I", frame[3][4:8])[0] == FRAME_SIZE_ERROR


def test_connection_window_overflow_is_a_flow_control_error() -> None:
    outcome, after = run(window_update(0, 2**31 - 1))
    assert code_of(outcome) == grpc.StatusCode.UNAVAILABLE
    frame = sent(after, GOAWAY)
    assert frame is not None and struct.unpack(">I", frame[3][4:8])[0] == FLOW_CONTROL_ERROR


def test_stream_window_overflow_is_a_stream_flow_control_error() -> None:
    outcome, after = run(window_update(1, 2**31 - 1))
    assert code_of(outcome) != grpc.StatusCode.OK
    frame = sent(after, RST_STREAM)
    assert frame is not None and frame[2] == 1 and struct.unpack(">I", frame[3])[0] == FLOW_CONTROL_ERROR


def test_goaway_before_the_reply_fails_the_call_as_unavailable() -> None:
    outcome, _ = run(goaway(0, 0))
    assert code_of(outcome) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("code", "status"),
    [(REFUSED_STREAM, grpc.StatusCode.UNAVAILABLE), (CANCEL, grpc.StatusCode.CANCELLED)],
    ids=["REFUSED_STREAM", "CANCEL"],
)
def test_rst_stream_fails_the_call_with_its_code(code: int, status: grpc.StatusCode) -> None:
    outcome, _ = run(rst_stream(1, code))
    assert code_of(outcome) == status


def test_settings_max_frame_size_out_of_range_is_a_protocol_error() -> None:
    outcome, after = run(settings_frame({5: 100}))
    assert code_of(outcome) == grpc.StatusCode.UNAVAILABLE
    frame = sent(after, GOAWAY)
    assert frame is not None and struct.unpack(">I", frame[3][4:8])[0] == PROTOCOL_ERROR


def test_ping_from_the_server_is_acknowledged() -> None:
    async def scenario() -> list:
        acked: list = []

        async def serve(reader, writer) -> None:
            try:
                await reader.readexactly(len(PREFACE))
                writer.write(settings_frame() + raw_frame(4, 1, 0) + ping(b"node-png"))
                acked.extend(await read_frames(reader, lambda f: f[0] == PING and f[1] & 1))
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        channel = H2Channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            call = asyncio.ensure_future(channel.unary("/s.S/M")(b"q", timeout=1))
            await asyncio.wait([call], timeout=3)
            if not call.done():
                call.cancel()
        finally:
            channel.close()
            server.close()
            await server.wait_closed()
        return acked

    frames = asyncio.run(scenario())
    ack = next((f for f in frames if f[0] == PING and f[1] & 1), None)
    assert ack is not None and ack[3] == b"node-png"

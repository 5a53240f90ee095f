"""The HTTP side port (METRICS_PORT): `/metrics`, the status page, `/healthz` and `/readyz`.

Served on the proxy's asyncio loop, not a thread per connection: a connection costs a small
task, at most `max_connections` are open at once (more are answered 503 and closed at accept),
and each must send a whole request head within `idle_timeout` seconds of the previous reply (or
of connecting), else it is closed; so a thousand idle or slow clients cost neither threads nor
more than a bounded number of sockets. Pages that take work (the Prometheus text, the status
snapshot, which reads the meta DB) are built on a two-thread pool of their own, never on the
loop and never on the meta DB query threads.

| path | answer |
|---|---|
| `/metrics` | Prometheus text format |
| `/`, `/status` | the status page (HTML) |
| `/status.json` | the same data as JSON |
| `/healthz` | 200 while the process serves HTTP (liveness) |
| `/readyz` | 200 when serving, the meta DB can be read and some node can answer; else 503 and the reason |
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics
from .status import StatusSource, render_html

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # bytes of request line and headers; a longer head is answered 431
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large", 500: "Error"}
_REASONS[503] = "Service Unavailable"
_TEXT = "text/plain; charset=utf-8"


def bind_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is); raises OSError when taken."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)


class ObservabilityServer:
    """The side port on the running event loop; `port` is the bound one."""

    def __init__(
        self,
        metrics: Metrics,
        source: StatusSource,
        *,
        idle_timeout: float = 15.0,
        max_connections: int = 64,
    ) -> None:
        self.metrics = metrics
        self.source = source
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.served_connections = 0  # accepted and served, ever
        self.refused_connections = 0  # closed at accept because `max_connections` were open
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._pages = ThreadPoolExecutor(2, thread_name_prefix="mishards-http")
        self.port = 0

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound socket (bind early, so a taken METRICS_PORT stops start-up at once)."""
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._connection, sock=sock, limit=MAX_REQUEST_HEAD)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
        self._pages.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ connections
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            writer.write(_response(503, _TEXT, b"too many connections to the status port\n", keep_alive=False))
            writer.transport.close()  # sends what is buffered, then closes; nothing is awaited
            return
        self.open_connections += 1
        self.served_connections += 1
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to answer
        except Exception:  # noqa: BLE001 - one bad request must not take the port down
            log.exception("status port: a connection failed")
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep the connection for another."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, _TEXT, b"request head too large\n", keep_alive=False)
            return False
        except asyncio.IncompleteReadError:
            return False  # closed by the client between requests
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._send(writer, 400, _TEXT, b"bad request line\n", keep_alive=False)
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        keep_alive = headers.get("connection", "") != "close" if version == "HTTP/1.1" else False
        keep_alive = keep_alive or headers.get("connection", "") == "keep-alive"
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            await self._send(writer, 400, _TEXT, b"requests to the status port have no body\n", keep_alive=False)
            return False
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, _TEXT, b"only GET and HEAD\n", keep_alive=False)
            return False
        code, content_type, body = await self._route(target.split("?", 1)[0])
        await self._send(writer, code, content_type, b"" if method == "HEAD" else body, keep_alive, len(body))
        return keep_alive

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        content_type: str,
        body: bytes,
        keep_alive: bool,
        length: int | None = None,
    ) -> None:
        writer.write(_response(code, content_type, body, keep_alive, length))
        await asyncio.wait_for(writer.drain(), self.idle_timeout)

    # ------------------------------------------------------------------ pages
    async def _route(self, path: str) -> tuple[int, str, bytes]:
        try:
            if path == "/healthz":
                return 200, _TEXT, b"ok\n"
            if path == "/readyz":
                ready, reason = self.source.readiness()
                return (200 if ready else 503), _TEXT, f"{reason}\n".encode()
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, await self._off_loop(generate_latest, self.metrics.registry)
            if path in ("/", "/status"):
                page = await self._off_loop(lambda: render_html(self.source.snapshot()).encode())
                return 200, "text/html; charset=utf-8", page
            if path == "/status.json":
                body = await self._off_loop(lambda: json.dumps(self.source.snapshot(), indent=1).encode())
                return 200, "application/json", body
            return 404, _TEXT, b"not found; try /, /status.json, /metrics, /healthz, /readyz\n"
        except Exception:  # noqa: BLE001 - one bad page must not take the port down
            log.exception("HTTP %s failed", path)
            return 500, _TEXT, b"internal error, see the proxy's log\n"

    async def _off_loop(self, build: Callable, *args) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._pages, build, *args)


def _response(code: int, content_type: str, body: bytes, keep_alive: bool, length: int | None = None) -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "Cache-Control: no-store\r\nServer: mishards\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + body

"""The HTTP side port (METRICS_PORT): `/metrics`, the status page, `/healthz` and `/readyz`.

A stdlib threading HTTP server on a daemon thread: scrapes and page views never run on the
gRPC event loop, and they only read the proxy's state.

| path | answer |
|---|---|
| `/metrics` | Prometheus text format |
| `/`, `/status` | the status page (HTML) |
| `/status.json` | the same data as JSON |
| `/healthz` | 200 while the process serves HTTP (liveness) |
| `/readyz` | 200 when the gRPC server serves and some node can answer, else 503 with the reason |
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics
from .status import StatusSource, render_html

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics
    source: StatusSource


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "mishards"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics.registry))
            elif path in ("/", "/status"):
                self._send(200, "text/html; charset=utf-8", render_html(self.server.source.snapshot()).encode())
            elif path == "/status.json":
                self._send(200, "application/json", json.dumps(self.server.source.snapshot(), indent=1).encode())
            elif path == "/healthz":
                self._send(200, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/readyz":
                ready, reason = self.server.source.readiness()
                self._send(200 if ready else 503, "text/plain; charset=utf-8", f"{reason}\n".encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found; try /, /status.json, /metrics\n")
        except Exception:  # noqa: BLE001 - one bad page must not kill the server thread
            log.exception("HTTP %s failed", path)
            self._send(500, "text/plain; charset=utf-8", b"internal error, see the proxy's log\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("HTTP %s " + format, self.client_address[0], *args)


class ObservabilityServer:
    """Serves the side port on a daemon thread; `port` is the bound one (0 asks for a free port)."""

    def __init__(self, host: str, port: int, metrics: Metrics, source: StatusSource) -> None:
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.metrics = metrics
        self._server.source = source
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="mishards-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

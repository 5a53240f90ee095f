"""A fake Kubernetes API server for discovery tests (docs/development.md).

It serves what the real `kubernetes` client asks for when it lists and watches pods: the pod
list (filtered by label selector, with a resourceVersion), single pods, and chunked watch streams
that replay changes newer than the requested resourceVersion and then stream new ones. On demand
it expires watches (410 Gone), drops streams without the terminating chunk, answers every request
with an error status (an API server that is down), or stalls (sends nothing at all).

Each fake pod stands for a real `milvus_node` process on 127.0.0.1. Several pods share that IP,
so every pod carries a test-only annotation (`PORT_ANNOTATION`) with its node's port; the proxy
reads it through `DISCOVERY_KUBERNETES_PORT_ANNOTATION`.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

PORT_ANNOTATION = "mishards.test/port"
LABELS = {"app": "mishards", "tier": "ro-servers"}
MAX_STREAM_S = 120.0  # no watch stream outlives this, whatever the test does
STALL_LIMIT_S = 60.0


def status_object(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 (and its key) made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class FakeKubeAPI:
    """Pods in one namespace, a global resourceVersion counter and the change history."""

    def __init__(
        self, namespace: str = "mishards", token: str = "test-token", tls: tuple[Path, Path] | None = None
    ) -> None:
        self.namespace = namespace
        self.token = token
        self.tls = tls
        self.pods: dict[str, dict] = {}
        self.resource_version = 10
        self.history: list[tuple[int, str, dict]] = []  # (rv, event type, pod)
        self.oldest_watchable = 0  # a watch from an older resourceVersion gets 410 Gone
        self.expire_generation = 0
        self.drop_generation = 0
        self.fail_status: int | None = None
        self.failed_requests = 0  # requests answered with fail_status
        self.stalled = False
        self.watch_requests = 0
        self.list_requests = 0
        self.cond = threading.Condition()
        self.closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ server
    def start(self) -> FakeKubeAPI:
        api = self

        class Handler(_Handler):
            fake = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=str(self.tls[0]), keyfile=str(self.tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="fake-kube-api", daemon=True
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.stalled = False
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {  # JSON is YAML
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": self.token}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # ------------------------------------------------------------------ pods
    def put_pod(
        self,
        name: str,
        *,
        port: int,
        ready: bool = True,
        ip: str | None = "127.0.0.1",
        phase: str = "Running",
        labels: dict | None = None,
        notify: bool = True,
    ) -> None:
        """Create or update a pod; `notify=False` changes it without telling watchers (seen only by a re-list)."""
        with self.cond:
            kind = "MODIFIED" if name in self.pods else "ADDED"
            self.resource_version += 1
            status: dict = {
                "phase": phase,
                "conditions": [
                    {"type": "Ready", "status": "True" if ready else "False"},
                    {"type": "ContainersReady", "status": "True" if ready else "False"},
                ],
            }
            if ip:
                status["podIP"] = ip
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "uid": f"u-{name}",
                    "resourceVersion": str(self.resource_version),
                    "labels": dict(LABELS if labels is None else labels),
                    "annotations": {PORT_ANNOTATION: str(port)},
                },
                "spec": {"containers": [{"name": "milvus", "image": "milvusdb/milvus:0.9.1-cpu"}]},
                "status": status,
            }
            self.pods[name] = pod
            if notify:
                self.history.append((self.resource_version, kind, pod))
            self.cond.notify_all()

    def delete_pod(self, name: str, notify: bool = True) -> None:
        with self.cond:
            pod = self.pods.pop(name)
            self.resource_version += 1
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self.resource_version)
            if notify:
                self.history.append((self.resource_version, "DELETED", pod))
            self.cond.notify_all()

    # ------------------------------------------------------------------ faults
    def expire_watches(self) -> None:
        """Open watches get a 410 ERROR event; watches from before now are refused with it too."""
        with self.cond:
            self.oldest_watchable = self.resource_version  # a fresh list's resourceVersion is still fine
            self.expire_generation += 1
            self.cond.notify_all()

    def drop_streams(self) -> None:
        """Open watch streams are cut without the terminating chunk."""
        with self.cond:
            self.drop_generation += 1
            self.cond.notify_all()

    def fail(self, status: int | None) -> None:
        """Answer every request with `status` (None: serve normally again)."""
        with self.cond:
            self.fail_status = status
            self.cond.notify_all()

    def stall(self, stalled: bool) -> None:
        """Send nothing at all: open streams go quiet, new requests get no answer."""
        with self.cond:
            self.stalled = stalled
            self.cond.notify_all()

    # ------------------------------------------------------------------ queries
    def matching(self, selector: str) -> list[dict]:
        wanted = [part.split("=", 1) for part in selector.split(",") if part]
        return [pod for pod in self.pods.values() if all(pod["metadata"]["labels"].get(k) == v for k, v in wanted)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKubeAPI

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        pass

    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _wait_while_stalled(self) -> bool:
        """True if the request stalled (then it is dropped unanswered)."""
        fake = self.fake
        deadline = time.monotonic() + STALL_LIMIT_S
        with fake.cond:
            if not fake.stalled:
                return False
            while fake.stalled and time.monotonic() < deadline:
                fake.cond.wait(0.1)
        self.close_connection = True
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        fake = self.fake
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self._wait_while_stalled():
            return
        if self.headers.get("Authorization", "").lower() != f"bearer {fake.token}":
            self._send_json(401, status_object(401, "Unauthorized", "Unauthorized"))
            return
        if fake.fail_status is not None:
            with fake.cond:
                fake.failed_requests += 1
            self._send_json(fake.fail_status, status_object(fake.fail_status, "InternalError", "fake outage"))
            return
        parts = url.path.strip("/").split("/")
        if (
            parts[:3] != ["api", "v1", "namespaces"]
            or len(parts) < 5
            or parts[4] != "pods"
            or parts[3] != fake.namespace
        ):
            self._send_json(404, status_object(404, "NotFound", f"{url.path} not found"))
            return
        if len(parts) == 6:
            with fake.cond:
                pod = fake.pods.get(parts[5])
            if pod is None:
                self._send_json(404, status_object(404, "NotFound", f'pods "{parts[5]}" not found'))
            else:
                self._send_json(200, pod)
            return
        if query.get("watch") in ("true", "1"):
            self._watch(query)
            return
        with fake.cond:
            fake.list_requests += 1
            body = {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(fake.resource_version)},
                "items": fake.matching(query.get("labelSelector", "")),
            }
        self._send_json(200, body)

    def _chunk(self, payload: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _watch(self, query: dict) -> None:
        fake = self.fake
        selector = query.get("labelSelector", "")
        wanted = [part.split("=", 1) for part in selector.split(",") if part]
        start_rv = int(query.get("resourceVersion") or 0)
        timeout = min(float(query.get("timeoutSeconds") or MAX_STREAM_S), MAX_STREAM_S)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        gone = status_object(410, "Expired", f"too old resource version: {start_rv}")
        with fake.cond:
            fake.watch_requests += 1
            expire_seen, drop_seen = fake.expire_generation, fake.drop_generation
            expired = start_rv < fake.oldest_watchable
        try:
            if expired:
                self._chunk(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                self._chunk(b"")
                return
            sent_rv = start_rv
            deadline = time.monotonic() + timeout
            while True:
                with fake.cond:
                    while fake.stalled and not fake.closing:  # say nothing, not even the end
                        fake.cond.wait(0.1)
                        deadline = time.monotonic() + timeout
                    if fake.closing:
                        break
                    if fake.drop_generation != drop_seen:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if fake.expire_generation != expire_seen:
                        events = [{"type": "ERROR", "object": gone}]
                        expire_seen = fake.expire_generation
                        finished = True
                    else:
                        events = [
                            {"type": kind, "object": pod}
                            for rv, kind, pod in fake.history
                            if rv > sent_rv and all(pod["metadata"]["labels"].get(k) == v for k, v in wanted)
                        ]
                        sent_rv = fake.history[-1][0] if fake.history and fake.history[-1][0] > sent_rv else sent_rv
                        finished = time.monotonic() >= deadline
                        if not events and not finished:
                            fake.cond.wait(0.1)
                for event in events:
                    self._chunk(json.dumps(event).encode() + b"\n")
                if finished:
                    break
            self._chunk(b"")
        except OSError:  # the client went away (timed out, or stopped)
            self.close_connection = True

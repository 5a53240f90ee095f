"""The real pymilvus client (0.2.12 or 0.2.14), run in a worker subprocess.

pymilvus' old generated modules need the pure-Python protobuf backend for the whole process, and
their descriptors would clash with ours, so the client lives in a child (docs/protocol.md,
"Old clients on a current protobuf"). Tests call it as if it were local:

    client = PymilvusClient("127.0.0.1", port)
    status, exists = client.has_collection("demo")

Every call is pickled to the worker, which calls the same method on `milvus.Milvus(host, port)`
and sends back plain Python: `Status`, `SearchResult`, dicts for other pymilvus objects, ints for
enums. Exceptions raised by pymilvus come back as `RemoteClientError`. Each call is bounded.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, BinaryIO

from tests.support.wheels import ROOT, extracted_wheel, shim_dir

DEFAULT_VERSION = "0.2.12"
_HEADER = struct.Struct(">Q")
_workers: set[PymilvusClient] = set()


@dataclass(frozen=True)
class Status:
    """A pymilvus Status: `code` is the Milvus error code, or a grpc.StatusCode name such as
    "UNAVAILABLE" when the call failed below the Milvus layer (docs/protocol.md, "The status convention")."""

    code: int | str
    message: str

    def OK(self) -> bool:  # noqa: N802 - the name pymilvus uses
        return self.code == 0


@dataclass(frozen=True)
class SearchResult:
    """A TopKQueryResult: rows cut at the first -1 id, `shape` as pymilvus reports it (nq, k)."""

    ids: list[list[int]]
    distances: list[list[float]]
    shape: tuple[int, int]


class RemoteClientError(Exception):
    """An exception raised by pymilvus in the worker (ParamError, NotConnectError, VersionError…)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class PymilvusWorkerError(RuntimeError):
    """The worker process died or broke the protocol."""


class PymilvusTimeout(PymilvusWorkerError, TimeoutError):
    """A call did not finish in time; the worker was killed."""


def write_frame(stream: BinaryIO | IO[bytes], value: Any) -> None:
    """One length-prefixed pickle."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next frame, or None at end of stream (blocking; used by the worker)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def plain_args(value: Any) -> Any:
    """numpy arrays and scalars become lists and numbers, so the worker needs no numpy pickles."""
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    if isinstance(value, dict):
        return {key: plain_args(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_args(item) for item in value)
    return value


class PymilvusClient:
    """A `milvus.Milvus(host, port, **client_kwargs)` of the given pymilvus version, in a worker.

    The constructor connects (pymilvus checks the server version there) and raises
    `RemoteClientError` if pymilvus refuses, e.g. with type_name "VersionError".
    """

    def __init__(
        self,
        host: str,
        port: int,
        version: str = DEFAULT_VERSION,
        timeout_s: float = 120.0,
        **client_kwargs: Any,
    ) -> None:
        self.host = host
        self.port = port
        self.version = version
        self.timeout_s = timeout_s
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(shim_dir()), str(extracted_wheel(version)), str(ROOT)])
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.pymilvus_worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        _workers.add(self)
        try:
            self.client_version: str = self._exchange((host, port, client_kwargs), timeout_s, "Milvus()")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, method: str, *args: Any, deadline_s: float | None = None, **kwargs: Any) -> Any:
        """`client.<method>(*args, **kwargs)` in the worker, bounded by deadline_s (default
        timeout_s). `timeout=` and the other keywords go to pymilvus unchanged."""
        request = (method, plain_args(args), plain_args(kwargs))
        return self._exchange(request, self.timeout_s if deadline_s is None else deadline_s, method)

    def _exchange(self, request: Any, timeout_s: float, label: str) -> Any:
        if self._stderr.closed:
            raise PymilvusWorkerError("the pymilvus client was closed")
        if self._proc.poll() is not None or self._proc.stdin is None:
            raise PymilvusWorkerError(f"the pymilvus worker has exited{self._stderr_tail()}")
        try:
            write_frame(self._proc.stdin, request)
        except BrokenPipeError as exc:
            raise PymilvusWorkerError(f"the pymilvus worker has exited{self._stderr_tail()}") from exc
        deadline = time.monotonic() + timeout_s
        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline, label))
        reply = pickle.loads(self._read_exact(size, deadline, label))
        if reply[0] == "error":
            raise RemoteClientError(reply[1], reply[2])
        return reply[1]

    def _read_exact(self, size: int, deadline: float, label: str) -> bytes:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        chunks: list[bytes] = []
        while size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                raise PymilvusTimeout(f"pymilvus call {label} timed out; worker killed")
            chunk = os.read(fd, size)
            if not chunk:
                self._proc.wait()
                raise PymilvusWorkerError(
                    f"the pymilvus worker exited with code {self._proc.returncode}{self._stderr_tail()}"
                )
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _stderr_tail(self, limit: int = 4000) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-limit:]
        return f"; its stderr ends with:\n{text}" if text else ""

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        """End the worker: close its stdin (it closes the pymilvus client), then bounded wait."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()
        _workers.discard(self)

    def __enter__(self) -> PymilvusClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    """Workers nobody closed must not outlive the test run."""
    for worker in list(_workers):
        worker._kill()

"""The per-RPC wrapper: a server span and metrics around a handler when either is on, and a
WARNING for every failed call (rate-limited per method and code) always.

Every handler answers with bytes of the method's reply type, whose Milvus `Status` says whether
the call failed (gRPC itself says OK), so the wrapper reads that status from the reply bytes:
the whole message for `Status` replies, else field 1 found by skipping over the other fields
(a top-k reply is not decoded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from milvus_grpc import status_pb2
from tracer import Tracer
from utils.logger import RateLimitedLog
from utils.milvus_schema import REQUEST_CLASSES, STATUS_REPLY_METHODS, method_path

from .metrics import Metrics

failure_log = RateLimitedLog(logging.getLogger("mishards.failures"), interval=10.0)

Handler = Callable[[bytes, Any], Awaitable[bytes]]  # the context: service.RequestContext


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def status_field(reply: bytes) -> bytes | None:
    """The bytes of field 1 (`status`) of a reply message, or None when absent (SUCCESS)."""
    pos, end = 0, len(reply)
    while pos < end:
        key, pos = _varint(reply, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(reply, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(reply, pos)
            if pos + length > end:
                raise DecodeError("truncated field")
            if field == 1:
                return reply[pos : pos + length]
            pos += length
        else:
            raise DecodeError(f"unexpected wire type {wire_type}")
    return None


def reply_status(method: str, reply: bytes) -> tuple[int, str]:
    """(error_code, reason) of a reply; an unreadable reply counts as UNEXPECTED_ERROR (1)."""
    try:
        raw = reply if method in STATUS_REPLY_METHODS else status_field(reply)
        if raw is None:
            return 0, ""
        status = status_pb2.Status.FromString(raw)
    except (DecodeError, IndexError):
        return 1, "the reply is not a valid message"
    return status.error_code, status.reason


def collection_of(method: str, request: bytes) -> str:
    """The collection a request names ('' when none or unreadable); only decoded for failed calls."""
    request_class = REQUEST_CLASSES.get(method)
    if request_class is None:
        return ""
    try:
        message = request_class.FromString(request)
    except (DecodeError, TypeError):
        return ""
    for holder in (message, getattr(message, "search_param", None)):
        name = getattr(holder, "collection_name", None)
        if name:
            return str(name)
    names = getattr(message, "collection_name_array", None)
    return ",".join(names) if names else ""


def log_failure(method: str, request: bytes, code: int, reason: str, peer: str = "") -> None:
    """One WARNING per method and code per 10 s: the code, the collection, the reason and the caller."""
    held_back = failure_log.allow((method, code))
    if held_back is None:
        return
    suffix = f" ({held_back} more {method} failures with code {code} in the last 10 s not logged)" if held_back else ""
    failure_log.logger.warning(
        "%s failed: code %d, collection %r: %s%s%s",
        method,
        code,
        collection_of(method, request),
        reason[:300],
        f" (client {peer})" if peer else "",
        suffix,
    )


def instrument(method: str, handle: Handler, tracer: Tracer, metrics: Metrics) -> Handler:
    """`handle` inside the RPC's server span and metrics; failed calls logged either way."""
    path = method_path(method)
    series = metrics.rpc(method) if metrics.enabled else None

    if not tracer.enabled and not metrics.enabled:

        async def logged(request: bytes, context: Any) -> bytes:
            reply = await handle(request, context)
            code, reason = reply_status(method, reply)
            if code:
                log_failure(method, request, code, reason, _peer(context))
            return reply

        return logged

    async def observed(request: bytes, context: Any) -> bytes:
        started = time.perf_counter()
        if tracer.enabled:
            with tracer.rpc_span(path, context.invocation_metadata(), context.peer()) as span:
                reply = await handle(request, context)
                code, reason = reply_status(method, reply)
                tracer.rpc_finished(span, code, reason, request, reply)
        else:
            reply = await handle(request, context)
            code, reason = reply_status(method, reply)
        if series is not None:
            series.observe(time.perf_counter() - started, code)
        if code:
            log_failure(method, request, code, reason, _peer(context))
        return reply

    return observed


def _peer(context: Any) -> str:
    try:
        return str(context.peer() or "")
    except Exception:  # noqa: BLE001 - a context without a peer still gets its failure logged
        return ""

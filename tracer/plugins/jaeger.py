"""`TRACER_CLASS_NAME=jaeger`: jaeger-client spans sent over UDP to a Jaeger agent, as the original.

The original wrapped a sync gRPC server with grpcio-opentracing's server interceptor. Our server
is grpc.aio, which that interceptor cannot wrap, so the proxy opens the server span itself
(`rpc_span`) with the interceptor's conventions: named after the method path, tagged
`component=grpc` and `span.kind=server`, continuing the trace found in the call's metadata, and
finished through a grpcio-opentracing `SpanDecorator` that marks a non-zero Milvus status with
`error=True` (the original's `GrpcSpanDecorator`). Spans live in a context-variable scope
manager, so children opened in tasks of one request find their parent.

Settings and defaults are the original's: TRACING_SERVICE_NAME (mishards), TRACING_VALIDATE
(True), TRACING_LOG_PAYLOAD (False), TRACING_SAMPLER_TYPE (const), TRACING_SAMPLER_PARAM (1),
TRACING_REPORTING_HOST (127.0.0.1), TRACING_REPORTING_PORT (5775), TRACING_LOGGING (True).
jaeger-client also reads JAEGER_TAGS (e.g. `ip=10.0.0.5`, which spares it probing interfaces).
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from typing import Any

import grpc_opentracing
import opentracing
from jaeger_client import Config
from opentracing.ext import tags as ot_tags
from opentracing.scope_managers.contextvars import ContextVarsScopeManager

from tracer import Metadata, Tracer
from tracer.common import TracingSettings, describe_payload
from utils.plugins import PluginError

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 5.0
_EXTRACT_ERRORS = (
    opentracing.UnsupportedFormatException,
    opentracing.InvalidCarrierException,
    opentracing.SpanContextCorruptedException,
)


class MilvusRpcInfo(grpc_opentracing.RpcInfo):
    """What a span decorator learns of one RPC: raw request and reply bytes and the reply's Milvus status."""

    def __init__(self, full_method: str, request: bytes, response: bytes, status_code: int, reason: str) -> None:
        self.full_method = full_method
        self.metadata = None
        self.timeout = None
        self.request = request
        self.response = response
        self.status_code = status_code
        self.reason = reason
        self.error = None if status_code == 0 else f"{status_code}: {reason}"


class MilvusStatusDecorator(grpc_opentracing.SpanDecorator):
    """A reply carrying a non-zero Milvus status is an error, though gRPC itself says OK."""

    def __call__(self, span: opentracing.Span, rpc_info: MilvusRpcInfo) -> None:
        span.set_tag("milvus.status_code", rpc_info.status_code)
        if rpc_info.status_code:
            span.set_tag(ot_tags.ERROR, True)
            span.log_kv(
                {"event": "error", "error.kind": f"milvus status {rpc_info.status_code}", "message": rpc_info.reason}
            )


class JaegerTracer(Tracer):
    name = "jaeger"
    enabled = True

    def __init__(
        self,
        tracer: opentracing.Tracer,
        log_payloads: bool = False,
        span_decorator: grpc_opentracing.SpanDecorator | None = None,
    ) -> None:
        self.tracer = tracer
        self.log_payloads = log_payloads
        self.span_decorator = span_decorator or MilvusStatusDecorator()

    @classmethod
    def create(cls, config: dict[str, str]) -> JaegerTracer:
        settings = TracingSettings(config)
        jaeger_config = {
            "sampler": {
                "type": settings.str("TRACING_SAMPLER_TYPE", "const"),
                "param": settings.str("TRACING_SAMPLER_PARAM", "1"),
            },
            "local_agent": {
                "reporting_host": settings.str("TRACING_REPORTING_HOST", "127.0.0.1"),
                "reporting_port": settings.int("TRACING_REPORTING_PORT", 5775),
            },
            "logging": settings.bool("TRACING_LOGGING", True),
        }
        try:
            tracer = Config(
                config=jaeger_config,
                service_name=settings.str("TRACING_SERVICE_NAME", "mishards"),
                validate=settings.bool("TRACING_VALIDATE", True),
                scope_manager=ContextVarsScopeManager(),
            ).new_tracer()
        except ValueError as exc:  # e.g. an unknown sampler type
            raise PluginError(f"jaeger tracer: {exc} (see TRACING_SAMPLER_TYPE, TRACING_SAMPLER_PARAM)") from exc
        logging.getLogger("jaeger_tracing").setLevel(logging.ERROR)
        return cls(tracer, log_payloads=settings.bool("TRACING_LOG_PAYLOAD", False))

    def span(self, operation: str, parent: Any = None, **tags: Any) -> AbstractContextManager[opentracing.Scope]:
        if isinstance(parent, opentracing.Scope):
            parent = parent.span
        return self.tracer.start_active_span(operation, child_of=parent, tags=tags or None)

    def rpc_span(
        self, method_path: str, metadata: Metadata | None, peer: str
    ) -> AbstractContextManager[opentracing.Scope]:
        caller = None
        if metadata:
            try:
                caller = self.tracer.extract(
                    opentracing.Format.HTTP_HEADERS, {k: v for k, v in metadata if isinstance(v, str)}
                )
            except _EXTRACT_ERRORS as exc:
                log.debug("no usable trace context from the caller of %s: %s", method_path, exc)
        tags = {ot_tags.COMPONENT: "grpc", ot_tags.SPAN_KIND: ot_tags.SPAN_KIND_RPC_SERVER, "peer.address": peer}
        return self.tracer.start_active_span(method_path, child_of=caller, tags=tags, ignore_active_span=True)

    def rpc_finished(
        self, span: opentracing.Scope, status_code: int, reason: str, request: bytes, reply: bytes
    ) -> None:
        method_path = span.span.operation_name
        if self.log_payloads:
            span.span.log_kv(
                {
                    "request": describe_payload(method_path, request, True),
                    "response": describe_payload(method_path, reply, False),
                }
            )
        self.span_decorator(span.span, MilvusRpcInfo(method_path, request, reply, status_code, reason))

    def set_error(self, span: opentracing.Scope, message: str) -> None:
        span.span.set_tag(ot_tags.ERROR, True)
        span.span.log_kv({"event": "error", "message": message})

    def outgoing_metadata(self) -> Metadata | None:
        scope = self.tracer.scope_manager.active
        if scope is None:
            return None
        carrier: dict[str, str] = {}
        self.tracer.inject(scope.span.context, opentracing.Format.HTTP_HEADERS, carrier)
        return tuple((key.lower(), value) for key, value in carrier.items())

    def close(self) -> None:
        """Flush buffered spans (bounded). jaeger-client's close makes asyncio futures of whatever loop
        calls it, so it runs on the reporter's own loop thread and we wait for it here."""
        io_loop = _reporter_loop(self.tracer.reporter)
        if io_loop is None:
            self.tracer.close()
            return
        flushed = threading.Event()

        def close_on_reporter_loop() -> None:
            self.tracer.close().add_done_callback(lambda _: flushed.set())

        io_loop.add_callback(close_on_reporter_loop)
        if not flushed.wait(CLOSE_TIMEOUT_S):
            log.warning("jaeger tracer did not flush within %.0f s; the last spans may be lost", CLOSE_TIMEOUT_S)


def _reporter_loop(reporter: Any) -> Any:
    """The tornado loop of the UDP reporter (inside a CompositeReporter when TRACING_LOGGING is on)."""
    for candidate in (reporter, *getattr(reporter, "reporters", ())):
        if getattr(candidate, "io_loop", None) is not None:
            return candidate.io_loop
    return None


PLUGIN = JaegerTracer

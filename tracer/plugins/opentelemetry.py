"""`TRACER_CLASS_NAME=opentelemetry`: OpenTelemetry spans exported with OTLP (Jaeger ingests OTLP).

jaeger-client is no longer maintained; this plugin gives the same span tree (one server span
per RPC named after the method path, `get_routing`, `do_search`, `search_<node>`, `do_merge`)
through the OpenTelemetry SDK, with W3C `traceparent` propagation to and from gRPC metadata.
It keeps a tracer provider of its own, so it neither reads nor replaces the process-wide one.

Settings: TRACING_SERVICE_NAME (mishards), TRACING_SAMPLER_TYPE / TRACING_SAMPLER_PARAM
(`const` 1/0 = always/never, `probabilistic` = ratio; parent-based either way),
TRACING_LOG_PAYLOAD (False), TRACING_OTLP_ENDPOINT (the exporter's default, or the standard
OTEL_EXPORTER_OTLP_* variables, which the exporter reads itself).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from tracer import Metadata, Tracer
from tracer.common import TracingSettings, describe_payload
from utils.plugins import PluginError


def sampler_from(settings: TracingSettings) -> Sampler:
    kind = settings.str("TRACING_SAMPLER_TYPE", "const").lower()
    root: Sampler
    if kind == "const":
        root = ALWAYS_ON if settings.float("TRACING_SAMPLER_PARAM", 1.0) else ALWAYS_OFF
    elif kind == "probabilistic":
        root = TraceIdRatioBased(settings.float("TRACING_SAMPLER_PARAM", 1.0))
    else:
        raise PluginError(f"TRACING_SAMPLER_TYPE must be const or probabilistic for opentelemetry, got {kind!r}")
    return ParentBased(root)


class OpenTelemetryTracer(Tracer):
    name = "opentelemetry"
    enabled = True

    def __init__(self, provider: TracerProvider, log_payloads: bool = False) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("mishards")
        self.log_payloads = log_payloads
        self._propagator = get_global_textmap()  # W3C trace context + baggage unless OTEL_PROPAGATORS says otherwise

    @classmethod
    def create(cls, config: dict[str, str], processor: SpanProcessor | None = None) -> OpenTelemetryTracer:
        """`processor` replaces the OTLP batch export (tests pass one around an in-memory exporter)."""
        settings = TracingSettings(config)
        resource = Resource.create({SERVICE_NAME: settings.str("TRACING_SERVICE_NAME", "mishards")})
        provider = TracerProvider(resource=resource, sampler=sampler_from(settings))
        provider.add_span_processor(processor or BatchSpanProcessor(cls._otlp_exporter(settings)))
        return cls(provider, log_payloads=settings.bool("TRACING_LOG_PAYLOAD", False))

    @staticmethod
    def _otlp_exporter(settings: TracingSettings) -> SpanExporter:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.str("TRACING_OTLP_ENDPOINT", "")
        return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()

    def span(self, operation: str, parent: Any = None, **tags: Any) -> AbstractContextManager[trace.Span]:
        parent_context = trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_as_current_span(operation, context=parent_context, attributes=tags or None)

    def rpc_span(self, method_path: str, metadata: Metadata | None, peer: str) -> AbstractContextManager[trace.Span]:
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        caller = self._propagator.extract(carrier, context=otel_context.Context())
        return self.tracer.start_as_current_span(
            method_path,
            context=caller,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method_path.rsplit("/", 1)[-1], "peer.address": peer},
        )

    def rpc_finished(self, span: trace.Span, status_code: int, reason: str, request: bytes, reply: bytes) -> None:
        span.set_attribute("milvus.status_code", status_code)
        if self.log_payloads:
            method_path = getattr(span, "name", "")
            span.add_event(
                "payload",
                {
                    "request": describe_payload(method_path, request, True),
                    "response": describe_payload(method_path, reply, False),
                },
            )
        if status_code:
            self.set_error(span, f"milvus status {status_code}: {reason}")

    def set_error(self, span: trace.Span, message: str) -> None:
        span.set_attribute("error", True)
        span.set_status(Status(StatusCode.ERROR, message))

    def outgoing_metadata(self) -> Metadata | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return tuple(carrier.items()) or None

    def close(self) -> None:
        self.provider.shutdown()  # flushes the batch processor (bounded by its export timeout)


PLUGIN = OpenTelemetryTracer

"""TRACER_CLASS_NAME=opentelemetry: the same span tree through the OpenTelemetry SDK (in-memory exporter)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mishards.main import Mishards
from mishards.settings import load_settings
from tests.support.processes import LOCALHOST, free_port
from tests.support.stubs import milvus_stub, search_param
from tracer import create_tracer
from tracer.plugins.opentelemetry import OpenTelemetryTracer

from .conftest import COLLECTION, DIM, ObservedCluster

SEARCH = "/milvus.grpc.MilvusService/Search"


class InProcessProxy:
    """`Mishards` on its own event loop thread in this process, stopped the way SIGTERM stops it."""

    def __init__(self, app: Mishards, port: int) -> None:
        self.app = app
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="in-process-proxy")

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        await self.app.serve(self._stopping, self.port)

    def start(self) -> InProcessProxy:
        self.app.connect()
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.app.serving:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the in-process proxy did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=20)


@pytest.fixture
def otel_proxy(observed: ObservedCluster, monkeypatch):
    env = observed.proxy.env
    for name in ("WOSERVER", "SQLALCHEMY_DATABASE_URI", "DISCOVERY_STATIC_HOSTS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("SERVER_HOST", LOCALHOST)
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    exporter = InMemorySpanExporter()
    tracer = OpenTelemetryTracer.create(
        {"TRACING_SERVICE_NAME": "mishards-otel"}, processor=SimpleSpanProcessor(exporter)
    )
    proxy = InProcessProxy(Mishards(load_settings(), tracer=tracer), free_port()).start()
    try:
        yield proxy, exporter
    finally:
        proxy.stop()


def test_search_span_tree_with_w3c_context(observed: ObservedCluster, otel_proxy):
    proxy, exporter = otel_proxy
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    queries = np.random.default_rng(6).random((2, DIM)).astype(np.float32)
    with milvus_stub(f"{LOCALHOST}:{proxy.port}") as stub:
        reply = stub.Search(
            search_param(COLLECTION, queries, 5),
            timeout=20,
            metadata=(("traceparent", f"00-{trace_id:032x}-{parent_id:016x}-01"),),
        )
        missing = stub.Search(search_param("no_such_collection", queries, 5), timeout=20)
    assert reply.status.error_code == 0 and missing.status.error_code != 0

    spans = exporter.get_finished_spans()
    traced = [s for s in spans if s.context.trace_id == trace_id]
    (root,) = [s for s in traced if s.name == SEARCH]
    assert root.kind == SpanKind.SERVER and root.parent.span_id == parent_id
    assert root.resource.attributes["service.name"] == "mishards-otel"
    assert root.attributes["milvus.status_code"] == 0 and root.status.status_code != StatusCode.ERROR
    children = {s.name: s for s in traced if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(children) == {"get_routing", "do_search", "do_merge"}
    node_spans = [s for s in traced if s.name.startswith("search_")]
    assert sorted(s.name for s in node_spans) == sorted(f"search_{n.address}" for n in observed.readonly)
    assert all(s.parent.span_id == children["do_search"].context.span_id for s in node_spans)

    (failed,) = [s for s in spans if s.name == SEARCH and s.context.trace_id != trace_id]
    assert failed.parent is None
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["error"] is True


def test_outgoing_metadata_carries_the_current_span():
    exporter = InMemorySpanExporter()
    chosen = create_tracer("OpenTelemetry", config={"TRACING_OTLP_ENDPOINT": f"http://{LOCALHOST}:{free_port()}"})
    assert isinstance(chosen, OpenTelemetryTracer) and chosen.enabled
    chosen.close()  # selected by name with its OTLP exporter, which never sent anything; now one that records
    tracer = OpenTelemetryTracer.create({}, processor=SimpleSpanProcessor(exporter))
    assert tracer.outgoing_metadata() is None
    with tracer.span("search_node") as span:
        ((key, value),) = tracer.outgoing_metadata()
    assert key == "traceparent"
    assert value.split("-")[2] == f"{span.get_span_context().span_id:016x}"
    tracer.close()

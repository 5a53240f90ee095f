"""TRACER_CLASS_NAME=jaeger: the spans jaeger-client sends over UDP, decoded with its own thrift classes."""

from __future__ import annotations

import numpy as np

from milvus_grpc import milvus_pb2 as pb
from tests.support.stubs import milvus_stub, search_param

from .conftest import COLLECTION, DIM, ObservedCluster, Span

SEARCH = "/milvus.grpc.MilvusService/Search"
SEARCH_IN_FILES = "/milvus.grpc.MilvusService/SearchInFiles"


def _trace(spans: list[Span], trace_id: int) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def _complete_search_trace(trace_id: int, service: str, nodes: int):
    def ready(spans: list[Span]) -> bool:
        mine = [s for s in _trace(spans, trace_id) if s.service == service]
        return (
            any(s.name == SEARCH for s in mine)
            and any(s.name == "do_merge" for s in mine)
            and sum(s.name.startswith("search_") for s in mine) >= nodes
        )

    return ready


def _client_context(trace_id: int, span_id: int) -> tuple[tuple[str, str]]:
    """What a traced client sends: jaeger's header, `trace:span:parent:flags` in hex."""
    return (("uber-trace-id", f"{trace_id:x}:{span_id:x}:0:1"),)


def test_one_search_over_two_nodes_gives_the_span_tree(observed: ObservedCluster):
    trace_id, client_span = 0x5EA2C11, 0xC11E27
    queries = np.random.default_rng(3).random((2, DIM)).astype(np.float32)
    with milvus_stub(observed.proxy.address) as stub:
        reply = stub.Search(
            search_param(COLLECTION, queries, 5), metadata=_client_context(trace_id, client_span), timeout=20
        )
    assert reply.status.error_code == 0, reply.status

    spans = _trace(observed.sink.wait_for(_complete_search_trace(trace_id, "mishards", 2)), trace_id)
    by_name: dict[str, list[Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (root,) = by_name[SEARCH]
    assert root.parent_id == client_span, "the server span continues the caller's trace"
    assert root.tags["span.kind"] == "server" and root.tags["component"] == "grpc"
    assert root.tags["milvus.status_code"] == 0 and "error" not in root.tags
    for name in ("get_routing", "do_search", "do_merge"):
        (child,) = by_name[name]
        assert child.parent_id == root.span_id, name
    (do_search,) = by_name["do_search"]
    node_spans = [s for s in spans if s.name.startswith("search_")]
    assert sorted(s.name for s in node_spans) == sorted(f"search_{n.address}" for n in observed.readonly)
    assert all(s.parent_id == do_search.span_id for s in node_spans)
    assert sum(s.tags["files"] for s in node_spans) == 12
    assert {s.service for s in spans} == {"mishards"}


def test_trace_context_reaches_the_nodes(observed: ObservedCluster):
    """`front` searches through `proxy`: proxy's server span is a child of front's search_<proxy> span."""
    trace_id = 0xF4047
    queries = np.random.default_rng(4).random((1, DIM)).astype(np.float32)
    with milvus_stub(observed.front.address) as stub:
        reply = stub.Search(search_param(COLLECTION, queries, 5), metadata=_client_context(trace_id, 0xAB), timeout=20)
    assert reply.status.error_code == 0, reply.status

    def chained(spans: list[Span]) -> bool:
        mine = _trace(spans, trace_id)
        return _complete_search_trace(trace_id, "mishards", 2)(spans) and any(
            s.name == SEARCH and s.service == "front" for s in mine
        )

    spans = _trace(observed.sink.wait_for(chained), trace_id)
    (front_hop,) = [s for s in spans if s.service == "front" and s.name == f"search_{observed.proxy.address}"]
    (proxy_root,) = [s for s in spans if s.service == "mishards" and s.name == SEARCH_IN_FILES]
    assert proxy_root.parent_id == front_hop.span_id
    inner = [s for s in spans if s.service == "mishards" and s.name.startswith("search_")]
    assert len(inner) == 2, [s.name for s in spans]


def test_a_failed_reply_is_tagged_as_an_error(observed: ObservedCluster):
    trace_id = 0xBAD
    queries = np.zeros((1, DIM), np.float32)
    with milvus_stub(observed.proxy.address) as stub:
        reply = stub.Search(
            search_param("no_such_collection", queries, 5), metadata=_client_context(trace_id, 0x1), timeout=20
        )
        flushed = stub.Flush(
            pb.FlushParam(collection_name_array=["no_such_collection"]),
            metadata=_client_context(trace_id, 0x2),
            timeout=20,
        )
    assert reply.status.error_code != 0 and flushed.error_code != 0

    def both(spans: list[Span]) -> bool:
        return {s.name for s in _trace(spans, trace_id)} >= {SEARCH, "/milvus.grpc.MilvusService/Flush"}

    spans = _trace(observed.sink.wait_for(both), trace_id)
    for span in spans:
        if span.name in (SEARCH, "/milvus.grpc.MilvusService/Flush"):
            assert span.tags.get("error") is True, span
            assert span.tags["milvus.status_code"] != 0

"""No tracer and no metrics cost nothing; plugins are chosen by name; bad settings name their variable."""

from __future__ import annotations

import asyncio
import logging

import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from mishards.observability import rpc
from mishards.observability.metrics import NoMetrics
from mishards.observability.rpc import instrument, reply_status, status_field
from tracer import Tracer, create_tracer
from utils.logger import RateLimitedLog, redact
from utils.plugins import PluginError


async def _handler(request: bytes, context) -> bytes:
    return b""


def test_no_tracer_is_free():
    tracer = create_tracer("")
    assert type(tracer) is Tracer and not tracer.enabled
    assert tracer.span("do_merge") is tracer.span("get_routing")  # one shared object: nothing allocated
    assert tracer.outgoing_metadata() is None
    wrapped = instrument("Search", _handler, tracer, NoMetrics())
    assert wrapped.__name__ == "logged", "tracing and metrics off: only the failure log, no span, no series"


class _Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


def test_failed_calls_are_logged_rate_limited_with_code_and_collection(caplog, monkeypatch):
    monkeypatch.setattr(rpc, "failure_log", RateLimitedLog(logging.getLogger("mishards.failures"), interval=60))
    status = status_pb2.Status(error_code=15, reason="meta DB query failed")
    failed = pb.TopKQueryResult(status=status).SerializeToString()

    async def failing(request: bytes, context) -> bytes:
        return failed

    async def insert_fails(request: bytes, context) -> bytes:
        return pb.VectorIds(status=status_pb2.Status(error_code=4, reason="collection not found")).SerializeToString()

    search = instrument("Search", failing, create_tracer(""), NoMetrics())
    insert = instrument("Insert", insert_fails, create_tracer(""), NoMetrics())
    request = pb.SearchParam(collection_name="books", topk=3).SerializeToString()
    with caplog.at_level(logging.WARNING, logger="mishards.failures"):
        for _ in range(50):
            asyncio.run(search(request, _Context()))
        asyncio.run(insert(pb.InsertParam(collection_name="gone").SerializeToString(), _Context()))
    lines = [r.getMessage() for r in caplog.records if r.name == "mishards.failures"]
    assert len(lines) == 2, lines  # 50 failed searches: one line until the interval passes
    assert "Search failed: code 15, collection 'books': meta DB query failed" in lines[0]
    assert "127.0.0.1:5000" in lines[0]
    assert "Insert failed: code 4, collection 'gone'" in lines[1]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "mishards.failures")


def test_rate_limited_log_reports_what_it_held_back():
    limiter = RateLimitedLog(logging.getLogger("test"), interval=0.0)
    assert limiter.allow("k") == 0 and limiter.allow("k") == 0
    limiter.interval = 60
    assert limiter.allow("k") is None and limiter.allow("k") is None
    limiter.interval = 0
    assert limiter.allow("k") == 2, "the next line carries the count held back"


def test_unknown_tracer_lists_the_available_ones():
    with pytest.raises(PluginError, match="Available: jaeger, opentelemetry"):
        create_tracer("zipkin")


def test_jaeger_is_chosen_by_name_with_the_original_defaults():
    tracer = create_tracer("Jaeger", config={"TRACING_REPORTING_PORT": "9", "TRACING_LOGGING": "false"})
    try:
        assert tracer.name == "jaeger" and tracer.enabled
        assert tracer.tracer.service_name == "mishards"
        assert tracer.log_payloads is False
        with tracer.span("get_routing") as scope:
            ((key, value),) = tracer.outgoing_metadata()
        assert key == "uber-trace-id" and value.split(":")[1] == f"{scope.span.span_id:x}"
    finally:
        tracer.close()


@pytest.mark.parametrize(
    "config, variable",
    [
        ({"TRACING_REPORTING_PORT": "port"}, "TRACING_REPORTING_PORT"),
        ({"TRACING_LOG_PAYLOAD": "maybe"}, "TRACING_LOG_PAYLOAD"),
        ({"TRACING_SAMPLER_TYPE": "sometimes"}, "TRACING_SAMPLER_TYPE"),
    ],
)
def test_bad_tracing_settings_name_the_variable(config, variable):
    with pytest.raises(PluginError, match=variable):
        create_tracer("jaeger", config=config)


def test_unknown_tracer_is_a_plugin_error():
    with pytest.raises(PluginError, match="nosuchtracer"):
        create_tracer("nosuchtracer")


def test_reply_status_reads_field_one_without_decoding_the_rest():
    failed = pb.TopKQueryResult(
        status=status_pb2.Status(error_code=9, reason="nope"), row_num=2, ids=[1, 2], distances=[0.5, 0.7]
    ).SerializeToString()
    assert reply_status("Search", failed) == (9, "nope")
    fine = pb.TopKQueryResult(row_num=2, ids=[1, 2], distances=[0.5, 0.7]).SerializeToString()
    assert status_field(fine) is None and reply_status("Search", fine) == (0, "")
    assert reply_status("Flush", status_pb2.Status(error_code=4, reason="x").SerializeToString()) == (4, "x")
    assert reply_status("Search", b"\x0a\x50")[0] == 1  # truncated: UNEXPECTED_ERROR, never an exception


def test_secrets_never_reach_a_log_line():
    line = redact("meta mysql+pymysql://root:s3cret@127.0.0.1:3306/milvus?password=other&charset=utf8mb4 token: abc")
    assert "s3cret" not in line and "other" not in line and "abc" not in line
    assert "root:***@127.0.0.1" in line

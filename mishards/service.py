"""The Milvus API on the proxy: every RPC is handled as raw bytes, on one asyncio event loop.

Calls that are not searches go to the writable node as the bytes the client sent, with the
caller's deadline, and its reply comes back byte for byte. Searches are routed over the
read-only nodes (see `search`). Every failure the proxy can foresee becomes a Milvus `Status`
in a reply of the method's own type; the hybrid RPCs are not registered, so gRPC answers
UNIMPLEMENTED for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tracer import Tracer
from utils import validation
from utils.errors import (
    ConnectFailed,
    IllegalArgument,
    IllegalVectorId,
    MilvusError,
    collection_missing,
    status_of,
)

from .core import wire
from .core.hedging import TailTolerance
from .core.http2 import DEFAULT_LIMITS, Limits
from .core.merge import is_descending, is_match_filter, padding_distance
from .meta import IN_PROGRESS_FILE_TYPES, FileSet, MetaReader, SchemaCache
from .nodes import SERVICE, Membership, NodeClient
from .observability.metrics import Metrics
from .observability.rpc import instrument
from .search import ReloadTracker, Scatter
from .transport import H2Server, RequestContext

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_GET_IDS = 1000  # a node's GetVectorsByID answers at most this many ids per request

_SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["MilvusService"]
VECTOR_METHODS = [m.name for m in _SERVICE_DESCRIPTOR.methods if m.index < 26]  # 1..25 + ReloadSegments
REPLY_TYPES = {m.name: message_factory.GetMessageClass(m.output_type) for m in _SERVICE_DESCRIPTOR.methods}
REQUEST_TYPES = {m.name: m.input_type.name for m in _SERVICE_DESCRIPTOR.methods}
INVALIDATES_SCHEMA = {
    "CreateCollection": pb.CollectionSchema,
    "DropCollection": pb.CollectionName,
    "CreatePartition": pb.PartitionParam,
    "DropPartition": pb.PartitionParam,
}


def error_reply(method: str, error: BaseException) -> bytes:
    """The method's reply type carrying the error's Status (a bare Status for Status replies)."""
    status = status_of(error)
    reply_type = REPLY_TYPES[method]
    if reply_type is status_pb2.Status:
        return status.SerializeToString()
    return reply_type(status=status).SerializeToString()


class MishardsService:
    def __init__(
        self,
        *,
        writable: NodeClient,
        membership: Membership,
        meta: MetaReader,
        schemas: SchemaCache,
        router,
        tracer: Tracer,
        timeout: float,
        max_retry: int,
        metrics: Metrics | None = None,
        tolerance: TailTolerance | None = None,
        partial_results: bool = False,
    ) -> None:
        self.writable = writable
        self.membership = membership
        self.meta = meta
        self.schemas = schemas
        self.tracer = tracer
        self.timeout = timeout
        self.reloads = ReloadTracker()
        self.metrics = metrics
        self.scatter = Scatter(
            membership=membership,
            writable=writable,
            router=router,
            tracer=tracer,
            reloads=self.reloads,
            max_retry=max_retry,
            metrics=metrics,
            tolerance=tolerance,
            partial_results=partial_results,
        )
        self.backend_version = ""
        self._special: dict[str, Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]] = {
            "Search": self.search,
            "SearchInFiles": self.search_in_files,
            "SearchByID": self.search_by_id,
            "Cmd": self.cmd,
            "PreloadCollection": self.preload,
            "ReloadSegments": self.reload_segments,
        }

    # ------------------------------------------------------------------ plumbing
    def handlers(self) -> dict[str, Callable[[bytes, RequestContext], Awaitable[bytes]]]:
        """Raw-bytes handlers by method path, for `transport.H2Server`."""
        return {f"/{SERVICE}/{name}": self._handler(name) for name in VECTOR_METHODS}

    async def _db(self, call: Callable[..., Awaitable[T]], *args) -> T:
        """A meta DB read (on the loop: SQLite inline, MySQL over the held session), timed when metrics are on."""
        if self.metrics is None:
            return await call(*args)
        started = time.perf_counter()
        try:
            return await call(*args)
        finally:
            self.metrics.meta_query(call.__qualname__).observe(time.perf_counter() - started)

    def _handler(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        special = self._special.get(method)
        invalidates = INVALIDATES_SCHEMA.get(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                if special is not None:
                    return await special(request, context)
                reply = await self.forward(method, request, context)
                if invalidates is not None:
                    self.schemas.invalidate(invalidates.FromString(request).collection_name)
                return reply
            except MilvusError as exc:
                return error_reply(method, exc)
            except DecodeError:
                return error_reply(
                    method, IllegalArgument(f"{method}: the request is not a valid {REQUEST_TYPES[method]} message")
                )
            except Exception as exc:  # noqa: BLE001 - a bug must still answer with a Status
                log.exception("%s failed", method)
                return error_reply(method, exc)

        return instrument(method, handle, self.tracer, self.metrics)

    def budget(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds this request may still take: the caller's deadline, capped by TIMEOUT."""
        remaining = context.time_remaining()
        return self.timeout if remaining is None else max(min(remaining, self.timeout), 0.001)

    async def forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Send the request bytes to the writable node and return its reply bytes unchanged."""
        start = time.monotonic()
        try:
            reply = await self.writable.rpc(method)(
                request, timeout=self.budget(context), metadata=self.tracer.outgoing_metadata()
            )
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details() or ''}".strip()
            if exc.code() == grpc.StatusCode.INTERNAL and "deserializ" in (exc.details() or ""):
                # the node could not parse what the client sent: bad input, not an outage
                raise IllegalArgument(f"{method}: the request is not a valid {REQUEST_TYPES[method]} message") from None
            self.writable.record(False, time.monotonic() - start, error)
            if self.metrics is not None:
                series = self.metrics.node(self.writable.name)
                series.errors += 1
                series.latency.observe(time.monotonic() - start)
            raise ConnectFailed(f"writable node {self.writable.address} failed {method}: {error}") from None
        self.writable.record(True, time.monotonic() - start)
        if self.metrics is not None:
            self.metrics.node(self.writable.name).latency.observe(time.monotonic() - start)
        return reply

    # ------------------------------------------------------------------ search
    async def search(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        param = pb.SearchParam.FromString(request)
        return await self._search(
            param.collection_name,
            list(param.partition_tag_array),
            param.topk,
            len(param.query_record_array),
            request,
            context,
            None,
        )

    async def _search(
        self,
        name: str,
        tags: list[str],
        topk: int,
        nq: int,
        search_param: bytes,
        context: grpc.aio.ServicerContext,
        file_ids: list[str] | None,
    ) -> bytes:
        started = time.monotonic()
        validation.collection_name(name)
        validation.topk(topk)
        budget = self.budget(context)
        collection = await self._db(self.schemas.get, name, budget)
        if collection is None:
            raise collection_missing(name)
        if file_ids is None:
            tables = validation.select_tables(name, list(collection.partitions), tags)
            files = await self._db(self.meta.searchable_files, tables, budget)
        else:
            files = await self._db(self._given_files, collection.table_ids(), file_ids, budget)
        deadline = time.monotonic() + self.budget(context)
        if not files:  # nothing flushed yet: a plain search on the writable node, as the original did
            if file_ids is not None:
                return wire.encode_topk_result(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
            return await self.forward("Search", search_param, context)
        return await self.scatter.run(
            name,
            files,
            search_param,
            nq,
            topk,
            is_descending(collection.metric_type),
            deadline,
            started=started,
            match_filter=is_match_filter(collection.metric_type),
        )

    async def _given_files(self, table_ids: list[str], file_ids: list[str], timeout: float) -> FileSet:
        """SearchInFiles through the proxy (a stacked proxy): the named files of the collection, including
        ones merged or indexed since the caller routed them, as a node serves them; not files being written."""
        rows = await self.meta.files_by_ids(validation.file_ids(file_ids), timeout)
        if not rows:
            raise MilvusError("Invalid file id")
        own = set(table_ids)
        usable = sorted(
            (file_id, updated)
            for file_id, table_id, file_type, updated in rows
            if table_id in own and file_type not in IN_PROGRESS_FILE_TYPES
        )
        return FileSet([str(i) for i, _ in usable], np.array([t for _, t in usable], dtype=np.int64))

    async def search_in_files(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        param = pb.SearchInFilesParam.FromString(request)
        inner = param.search_param
        return await self._search(
            inner.collection_name,
            [],
            inner.topk,
            len(inner.query_record_array),
            inner.SerializeToString(),
            context,
            list(param.file_id_array),
        )

    async def search_by_id(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Vectors of the ids from the writable node, then an ordinary fan-out search with them."""
        param = pb.SearchByIDParam.FromString(request)
        validation.collection_name(param.collection_name)
        validation.topk(param.topk)
        if not param.id_array:
            raise IllegalVectorId("The id array is empty")
        records = []
        for start in range(0, len(param.id_array), MAX_GET_IDS):  # the node's GetVectorsByID cap
            identity = pb.VectorsIdentity(
                collection_name=param.collection_name, id_array=param.id_array[start : start + MAX_GET_IDS]
            )
            vectors = pb.VectorsData.FromString(
                await self.forward("GetVectorsByID", identity.SerializeToString(), context)
            )
            if vectors.status.error_code != 0:
                raise MilvusError(vectors.status.reason, vectors.status.error_code)
            records.extend(vectors.vectors_data)
        found = [i for i, record in enumerate(records) if record.float_data or record.binary_data]
        collection = await self._db(self.schemas.get, param.collection_name, self.budget(context))
        if collection is None:
            raise collection_missing(param.collection_name)
        empty = wire.encode_topk_result(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
        if not found:  # as the node: nothing to search with gives an empty reply
            return empty
        query = pb.SearchParam(
            collection_name=param.collection_name,
            partition_tag_array=param.partition_tag_array,
            query_record_array=[records[i] for i in found],
            topk=param.topk,
            extra_params=param.extra_params,
        )
        reply = await self._search(
            param.collection_name,
            list(param.partition_tag_array),
            param.topk,
            len(found),
            query.SerializeToString(),
            context,
            None,
        )
        code, reason, row_num, ids, distances = wire.decode_topk_result(reply)
        if code != 0:
            raise MilvusError(reason, code)
        if row_num == 0 or ids.size == 0:  # no live row searched
            return empty
        # one row per requested id, as wide as the search (never re-padded to topk); ids that are
        # not (or no longer) stored get a row of padding, like the node's own SearchByID
        width = ids.size // row_num
        out_ids = np.full((len(param.id_array), width), -1, dtype=np.int64)
        out_dist = np.full(
            (len(param.id_array), width), padding_distance(is_descending(collection.metric_type)), dtype=np.float32
        )
        out_ids[found] = ids.reshape(row_num, width)
        out_dist[found] = distances.reshape(row_num, width)
        return wire.encode_topk_result(out_ids, out_dist)

    # ------------------------------------------------------------------ cluster-wide calls
    async def _everywhere(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext, include_writable: bool
    ) -> bytes:
        """Send one request to the writable and/or every healthy read-only node in parallel; first error wins."""
        targets: dict[str, NodeClient] = dict(self.membership.healthy())
        if include_writable:
            targets["writable node"] = self.writable
        timeout = self.budget(context)
        names = list(targets)
        metadata = self.tracer.outgoing_metadata()
        replies = await asyncio.gather(
            *(targets[n].rpc(method)(request, timeout=timeout, metadata=metadata) for n in names),
            return_exceptions=True,
        )
        for name, reply in zip(names, replies, strict=True):
            if isinstance(reply, grpc.RpcError):
                if reply.code() == grpc.StatusCode.UNIMPLEMENTED and method == "ReloadSegments":
                    continue  # a 0.9 read-only node has nothing to reload
                raise ConnectFailed(f"{method} on {name} ({targets[name].address}) failed: {reply.code().name}")
            if isinstance(reply, BaseException):
                raise reply
            status = status_pb2.Status.FromString(reply)
            if status.error_code != 0:
                raise MilvusError(f"{method} on {name}: {status.reason}", status.error_code)
        return status_of(None).SerializeToString()

    async def preload(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pb.CollectionName.FromString(request)  # malformed input is the client's error, not a node's
        return await self._everywhere("PreloadCollection", request, context, include_writable=True)

    async def reload_segments(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pb.ReLoadSegmentsParam.FromString(request)
        return await self._everywhere("ReloadSegments", request, context, include_writable=False)

    # ------------------------------------------------------------------ Cmd
    async def cmd(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        command = pb.Command.FromString(request).cmd.strip()
        if command == "conn_stats":
            return pb.StringReply(
                status=status_of(None), string_reply=json.dumps(self.conn_stats())
            ).SerializeToString()
        if command == "version" and self.backend_version:
            # answered here so clients can connect (and search) while the writable node is down
            return pb.StringReply(status=status_of(None), string_reply=self.backend_version).SerializeToString()
        return await self.forward("Cmd", request, context)

    def conn_stats(self) -> dict:
        def describe(client: NodeClient) -> dict:
            s = client.stats
            health = s.last_health
            return {
                "address": client.address,
                "state": client.state,
                "healthy": s.healthy,
                "version": s.version,
                "last_error": s.last_error,
                "last_change": round(s.last_change, 3),
                "calls": s.calls,
                "failures": s.failures,
                "failovers": s.failovers,
                "files_routed": s.files_routed,
                "latency_ms": round(s.latency_ms_ewma, 3),
                "hedges": s.hedges,
                "hedges_won": s.hedges_won,
                "ejections": s.ejections,
                "last_health_check": None
                if health is None
                else {
                    "ok": health.ok,
                    "at": round(health.at, 3),
                    "latency_ms": round(health.latency_ms, 3),
                    "error": health.error,
                },
                "checks_failed_in_a_row": s.failures_in_a_row,
                "checks_passed_in_a_row": s.successes_in_a_row,
            }

        return {
            "writable": describe(self.writable),
            "readonly": {name: describe(client) for name, client in sorted(self.membership.all().items())},
            "waiting": self.membership.waiting(),
        }


async def start_server(
    service: MishardsService,
    host: str,
    port: int,
    transport: str = "http2",
    limits: Limits = DEFAULT_LIMITS,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server | H2Server, int]:
    """Serve the API on host:port (port 0: any free one); the server and its port. Call inside the loop.
    `reuse_port`: sibling worker processes listen on the same port (SO_REUSEPORT, SERVER_WORKERS).

    `http2` is the proxy's own HTTP/2 server (transport.py, about a third of grpc.aio's CPU per
    call, within `limits`: docs/front-door.md); `grpcio` is grpc.aio, kept as the fallback
    (RPC_TRANSPORT)."""
    if transport == "http2":
        server = H2Server(service.handlers(), limits)
        return server, await server.start(host, port, reuse_port)
    methods = {
        path.rpartition("/")[2]: grpc.unary_unary_rpc_method_handler(handler)
        for path, handler in service.handlers().items()
    }
    aio = grpc.aio.server(
        handlers=[grpc.method_handlers_generic_handler(SERVICE, methods)],
        options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    bound = aio.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await aio.start()
    return aio, bound

"""The gRPC face of the node: decodes requests, calls `NodeDB`, encodes replies.

Every foreseeable failure leaves as a Milvus `Status` inside an OK gRPC reply (mapped once, in
`utils.errors.status_of`); only the hybrid RPCs answer gRPC UNIMPLEMENTED, as the base servicer does.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import milvus_pb2_grpc
from utils import validation
from utils.errors import IllegalArgument, IllegalRowRecord, MilvusError, status_of
from utils.milvus_schema import is_binary

from .config import RuntimeConfig
from .db import NodeDB

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def records_to_array(records, binary: bool) -> np.ndarray:
    """RowRecords as one (n, width) array, without touching floats one by one in Python."""
    if not records:
        return np.zeros((0, 0), dtype=np.uint8 if binary else np.float32)
    if binary:
        if any(len(r.float_data) for r in records):
            raise IllegalRowRecord("Float vectors were sent to a binary collection")
        lengths = {len(r.binary_data) for r in records}
        if len(lengths) != 1 or 0 in lengths:
            raise IllegalRowRecord("Binary vectors must all be non-empty and of the same length")
        width = lengths.pop()
        return np.frombuffer(b"".join(r.binary_data for r in records), dtype=np.uint8).reshape(-1, width)
    if any(r.binary_data for r in records):
        raise IllegalRowRecord("Binary vectors were sent to a float collection")
    lengths = {len(r.float_data) for r in records}
    if len(lengths) != 1 or 0 in lengths:
        raise IllegalRowRecord("Float vectors must all be non-empty and of the same dimension")
    dim = lengths.pop()
    # A RowRecord with only float_data serializes as tag 0x0A, varint length, packed floats:
    # a fixed-size header per record that we strip in one reshape.
    blob = b"".join(r.SerializeToString() for r in records)
    stride = len(blob) // len(records)
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(len(records), stride)
    return rows[:, stride - 4 * dim :].copy().view("<f4").reshape(len(records), dim)


def _reply_on_error(reply_type: Callable[..., object] | None):
    """Run a handler; a MilvusError (or any bug) becomes a Status in the reply, never gRPC UNKNOWN."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(self, request, context):
            try:
                return handler(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure must become a Status
                if not isinstance(exc, MilvusError):
                    log.exception("%s failed", handler.__name__)
                status = status_of(exc)
                return status if reply_type is None else reply_type(status=status)

        return run

    return wrap


_OK = status_of(None)
_GONE = pb.TopKQueryResult()  # what a cancelled call "answers": grpcio sends nothing to a caller that left


class MilvusNodeServicer(milvus_pb2_grpc.MilvusServiceServicer):
    def __init__(self, db: NodeDB, config: RuntimeConfig, version: str) -> None:
        self.db = db
        self.config = config
        self.version = version

    def _binary(self, name: str) -> bool:
        return is_binary(self.db.collection(name).metric_type)

    # ------------------------------------------------------------------ collections
    @_reply_on_error(None)
    def CreateCollection(self, request, context):
        self.db.create_collection(
            request.collection_name, request.dimension, request.index_file_size, request.metric_type
        )
        return _OK

    @_reply_on_error(pb.BoolReply)
    def HasCollection(self, request, context):
        return pb.BoolReply(status=_OK, bool_reply=self.db.has_collection(request.collection_name))

    @_reply_on_error(pb.CollectionSchema)
    def DescribeCollection(self, request, context):
        row = self.db.collection(request.collection_name)
        return pb.CollectionSchema(
            status=_OK,
            collection_name=row.table_id,
            dimension=row.dimension,
            index_file_size=row.index_file_size // (1 << 20),
            metric_type=row.metric_type,
        )

    @_reply_on_error(pb.CollectionRowCount)
    def CountCollection(self, request, context):
        return pb.CollectionRowCount(status=_OK, collection_row_count=self.db.count(request.collection_name))

    @_reply_on_error(pb.CollectionNameList)
    def ShowCollections(self, request, context):
        return pb.CollectionNameList(status=_OK, collection_names=self.db.list_collections())

    @_reply_on_error(pb.CollectionInfo)
    def ShowCollectionInfo(self, request, context):
        stats = self.db.stats(request.collection_name)
        return pb.CollectionInfo(status=_OK, json_info=json.dumps(stats, sort_keys=True))

    @_reply_on_error(None)
    def DropCollection(self, request, context):
        self.db.drop_collection(request.collection_name)
        return _OK

    # ------------------------------------------------------------------ index
    @_reply_on_error(None)
    def CreateIndex(self, request, context):
        params = validation.json_params(request.extra_params, "index")
        self.db.create_index(request.collection_name, request.index_type, params)
        return _OK

    @_reply_on_error(pb.IndexParam)
    def DescribeIndex(self, request, context):
        index_type, params = self.db.describe_index(request.collection_name)
        return pb.IndexParam(
            status=_OK,
            collection_name=request.collection_name,
            index_type=index_type,
            extra_params=[pb.KeyValuePair(key="params", value=params)],
        )

    @_reply_on_error(None)
    def DropIndex(self, request, context):
        self.db.drop_index(request.collection_name)
        return _OK

    # ------------------------------------------------------------------ partitions
    @_reply_on_error(None)
    def CreatePartition(self, request, context):
        self.db.create_partition(request.collection_name, request.tag)
        return _OK

    @_reply_on_error(pb.BoolReply)
    def HasPartition(self, request, context):
        return pb.BoolReply(status=_OK, bool_reply=self.db.has_partition(request.collection_name, request.tag))

    @_reply_on_error(pb.PartitionList)
    def ShowPartitions(self, request, context):
        return pb.PartitionList(status=_OK, partition_tag_array=self.db.list_partitions(request.collection_name))

    @_reply_on_error(None)
    def DropPartition(self, request, context):
        self.db.drop_partition(request.collection_name, request.tag)
        return _OK

    # ------------------------------------------------------------------ data
    @_reply_on_error(pb.VectorIds)
    def Insert(self, request, context):
        binary = self._binary(request.collection_name)
        vectors = records_to_array(request.row_record_array, binary)
        ids = np.array(request.row_id_array, dtype=np.int64) if len(request.row_id_array) else None
        new_ids = self.db.insert(request.collection_name, request.partition_tag, vectors, ids)
        return pb.VectorIds(status=_OK, vector_id_array=new_ids.tolist())

    @_reply_on_error(pb.VectorsData)
    def GetVectorsByID(self, request, context):
        binary, vectors = self.db.get_vectors(request.collection_name, np.array(request.id_array, dtype=np.int64))
        records = []
        for vector in vectors:
            if vector is None:
                records.append(pb.RowRecord())
            elif binary:
                records.append(pb.RowRecord(binary_data=vector.tobytes()))
            else:
                records.append(pb.RowRecord(float_data=vector.tolist()))
        return pb.VectorsData(status=_OK, vectors_data=records)

    @_reply_on_error(pb.VectorIds)
    def GetVectorIDs(self, request, context):
        ids = self.db.segment_ids(request.collection_name, request.segment_name)
        return pb.VectorIds(status=_OK, vector_id_array=ids.tolist())

    @_reply_on_error(None)
    def DeleteByID(self, request, context):
        self.db.delete(request.collection_name, np.array(request.id_array, dtype=np.int64))
        return _OK

    @_reply_on_error(None)
    def Flush(self, request, context):
        self.db.flush(list(request.collection_name_array))
        return _OK

    @_reply_on_error(None)
    def Compact(self, request, context):
        self.db.compact(request.collection_name)
        return _OK

    @_reply_on_error(None)
    def PreloadCollection(self, request, context):
        self.db.preload(request.collection_name)
        return _OK

    @_reply_on_error(None)
    def ReloadSegments(self, request, context):
        self.db.reload_segments(request.collection_name, list(request.segment_id_array))
        return _OK

    # ------------------------------------------------------------------ search
    def _query(self, param: pb.SearchParam) -> tuple[list, np.ndarray, int, dict]:
        family = self.db.family(param.collection_name)
        validation.topk(param.topk)
        params = validation.json_params(param.extra_params, "search")
        queries = records_to_array(param.query_record_array, is_binary(family[0].metric_type))
        return family, queries, param.topk, params

    @staticmethod
    def _result(result) -> pb.TopKQueryResult:
        nq = result.ids.shape[0]
        return pb.TopKQueryResult(
            status=_OK, row_num=nq, ids=result.ids.ravel().tolist(), distances=result.distances.ravel().tolist()
        )

    @_reply_on_error(pb.TopKQueryResult)
    def Search(self, request, context):
        if not context.is_active():  # the caller reset the call while it waited for a worker
            return _GONE
        family, queries, topk, params = self._query(request)
        return self._result(self.db.search(family, list(request.partition_tag_array), queries, topk, params))

    @_reply_on_error(pb.TopKQueryResult)
    def SearchInFiles(self, request, context):
        if not context.is_active():  # a proxy cancels the node calls of a search its client gave up
            return _GONE
        param = request.search_param
        family, queries, topk, params = self._query(param)
        return self._result(self.db.search_in_files(family, list(request.file_id_array), queries, topk, params))

    @_reply_on_error(pb.TopKQueryResult)
    def SearchByID(self, request, context):
        validation.topk(request.topk)
        params = validation.json_params(request.extra_params, "search")
        return self._result(
            self.db.search_by_ids(
                request.collection_name,
                list(request.partition_tag_array),
                np.array(request.id_array, dtype=np.int64),
                request.topk,
                params,
            )
        )

    # ------------------------------------------------------------------ Cmd
    @_reply_on_error(pb.StringReply)
    def Cmd(self, request, context):
        return pb.StringReply(status=_OK, string_reply=self.command(request.cmd))

    def command(self, cmd: str) -> str:
        words = cmd.split()
        if cmd == "version":
            return self.version
        if cmd == "status":
            return "OK"
        if cmd == "mode":
            return "CPU"
        if cmd == "tasktable":
            return ""
        if cmd == "build_commit_id":
            return f"milvus_node-{self.version}"
        if cmd == "get_system_info":
            return json.dumps(
                {
                    "system_type": platform.system(),
                    "python": platform.python_version(),
                    "deploy_mode": self.config.get("server_config.deploy_mode"),
                }
            )
        if words and words[0] == "get_config":
            if len(words) != 2:
                raise IllegalArgument("Usage: get_config <parent>.<child>")
            return self.config.get(words[1])
        if words and words[0] == "set_config":
            if len(words) != 3:
                raise IllegalArgument("Usage: set_config <parent>.<child> <value>")
            self.config.set(words[1], words[2])
            return ""
        return "Unknown command"


def build_server(servicer: MilvusNodeServicer, host: str, port: int, workers: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS)
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound

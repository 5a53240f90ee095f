"""Raw gRPC access to a Milvus-speaking server with the project's own stubs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import milvus_pb2_grpc

OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@contextmanager
def milvus_stub(address: str) -> Iterator[milvus_pb2_grpc.MilvusServiceStub]:
    channel = grpc.insecure_channel(address, options=OPTIONS)
    try:
        yield milvus_pb2_grpc.MilvusServiceStub(channel)
    finally:
        channel.close()


def records(vectors: np.ndarray) -> list[pb.RowRecord]:
    if vectors.dtype == np.uint8:
        return [pb.RowRecord(binary_data=row.tobytes()) for row in vectors]
    return [pb.RowRecord(float_data=row) for row in vectors.tolist()]


def search_param(collection: str, queries: np.ndarray, topk: int, tags=(), params: str = "{}") -> pb.SearchParam:
    return pb.SearchParam(
        collection_name=collection,
        query_record_array=records(queries),
        topk=topk,
        partition_tag_array=list(tags),
        extra_params=[pb.KeyValuePair(key="params", value=params)],
    )


def result_rows(reply: pb.TopKQueryResult) -> tuple[list[list[int]], list[list[float]]]:
    """Rows as a client sees them: cut at the first -1."""
    if reply.row_num == 0:
        return [], []
    ids = np.array(reply.ids, dtype=np.int64).reshape(reply.row_num, -1)
    dist = np.array(reply.distances, dtype=np.float32).reshape(reply.row_num, -1)
    out_ids, out_dist = [], []
    for row_ids, row_dist in zip(ids, dist, strict=True):
        cut = int(np.argmax(row_ids == -1)) if (row_ids == -1).any() else row_ids.size
        out_ids.append(row_ids[:cut].tolist())
        out_dist.append(row_dist[:cut].tolist())
    return out_ids, out_dist

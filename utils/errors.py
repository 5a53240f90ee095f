"""One error taxonomy for the proxy and the node, mapped to Milvus status codes in one place.

Code raises a `MilvusError` subclass that says what went wrong; the gRPC layer turns it into a
`Status` with `status_of`. The families follow the request handler's `ErrorMap` of Milvus 0.9.1,
so a client sees the code a real server would send.
"""

from __future__ import annotations

from milvus_grpc import status_pb2

Code = status_pb2.ErrorCode


class MilvusError(Exception):
    """Base: an error that reaches the client as a Milvus `Status` (never as gRPC UNKNOWN)."""

    code: int = Code.UNEXPECTED_ERROR

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class UnexpectedError(MilvusError):
    code = Code.UNEXPECTED_ERROR


class IllegalArgument(MilvusError):
    code = Code.ILLEGAL_ARGUMENT


class CollectionNotExists(MilvusError):
    code = Code.COLLECTION_NOT_EXISTS


class IllegalCollectionName(MilvusError):
    code = Code.ILLEGAL_COLLECTION_NAME


class IllegalDimension(MilvusError):
    code = Code.ILLEGAL_DIMENSION


class IllegalIndexType(MilvusError):
    code = Code.ILLEGAL_INDEX_TYPE


class IllegalTopK(MilvusError):
    code = Code.ILLEGAL_TOPK


class IllegalRowRecord(MilvusError):
    code = Code.ILLEGAL_ROWRECORD


class IllegalVectorId(MilvusError):
    code = Code.ILLEGAL_VECTOR_ID


class IllegalMetricType(MilvusError):
    code = Code.ILLEGAL_METRIC_TYPE


class MetaFailed(MilvusError):
    code = Code.META_FAILED


class CacheFailed(MilvusError):
    code = Code.CACHE_FAILED


class PartitionError(MilvusError):
    """Partition-tag problems: not in Milvus' ErrorMap, so they surface as UNEXPECTED_ERROR."""

    code = Code.UNEXPECTED_ERROR


class NoAvailableNode(MilvusError):
    """No read-only node can take a search's files: none is registered, or every one was excluded.

    UNEXPECTED_ERROR, the code the original sent for its "Conn Group is Empty" failure.
    """

    code = Code.UNEXPECTED_ERROR


class ConnectFailed(MilvusError):
    """A backend node could not be reached or did not answer in time."""

    code = Code.CONNECT_FAILED


def collection_missing(name: str) -> CollectionNotExists:
    """The exact text Milvus 0.9.1 sends for an unknown collection."""
    return CollectionNotExists(
        f"Collection {name} does not exist. Use milvus.has_collection to verify whether the "
        "collection exists. You also can check whether the collection name exists."
    )


def status_of(error: BaseException | None) -> status_pb2.Status:
    """The wire `Status` for an outcome: SUCCESS for None, the error's code otherwise."""
    if error is None:
        return status_pb2.Status(error_code=Code.SUCCESS)
    if isinstance(error, MilvusError):
        return status_pb2.Status(error_code=error.code, reason=error.reason)
    return status_pb2.Status(error_code=Code.UNEXPECTED_ERROR, reason=f"{type(error).__name__}: {error}")

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
        return status_pb2.Status(error_code=int(error.code), reason=error.reason)  # type: ignore[arg-type]  # the stub wants its own enum type; the value is the same
    return status_pb2.Status(error_code=Code.UNEXPECTED_ERROR, reason=f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------- node calls
# The proxy's calls to its backend nodes fail with these, whatever carried them (the proxy's own
# HTTP/2 client or grpcio): the transport boundary, as httpx's TransportError family. They are not
# Milvus statuses; the service turns them into one (ConnectFailed, or IllegalArgument for a request
# the node could not parse). `code` is the gRPC status number the call ended with.
GRPC_CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class NodeCallError(Exception):
    """A node call that brought no reply; `str()` is "CODE_NAME details", as logs and errors show it."""

    code: int = 2  # UNKNOWN

    def __init__(self, details: str, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{GRPC_CODE_NAMES.get(self.code, 'UNKNOWN')} {details}".strip())


class NodeUnavailable(NodeCallError):
    """No connection, or it was lost, refused or closed: another node may answer."""

    code = 14


class NodeDeadline(NodeCallError):
    """No answer within the call's deadline."""

    code = 4


class NodeCancelled(NodeCallError):
    """The call was cancelled (by the node, or a stream reset)."""

    code = 1


class NodeUnimplemented(NodeCallError):
    """The node does not implement the method (a 0.9 backend asked for ReloadSegments)."""

    code = 12


class NodeProtocolError(NodeCallError):
    """The node answered, but not with a reply: a broken message, a refused size, an internal error."""

    code = 13


class NodeRejectedRequest(NodeProtocolError):
    """The node could not parse the request it was sent: the client's bad input, not an outage."""


_NODE_ERRORS: dict[int, type[NodeCallError]] = {
    1: NodeCancelled,
    4: NodeDeadline,
    12: NodeUnimplemented,
    13: NodeProtocolError,
    14: NodeUnavailable,
}


def node_call_error(code: int, details: str) -> NodeCallError:
    """The error of a call that ended with gRPC status `code`. grpcio servers (and our node) say
    "deserializ..." in an INTERNAL status when they cannot parse the request: that is recognised
    here, once, at the boundary."""
    if code == 13 and "deserializ" in details.lower():
        return NodeRejectedRequest(details)
    kind = _NODE_ERRORS.get(code)
    return kind(details) if kind is not None else NodeCallError(details, code)

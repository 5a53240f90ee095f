"""Milvus 0.9.1's numbers, in one place: what the meta DB's `state`, `file_type`, `metric_type` and
`engine_type` columns hold, and the gRPC service with its methods.

The proxy, the node, the status page and the tests read the same meta rows and speak the same
protocol, so each fact is written here once (docs/semantics.md, docs/protocol.md). The values
are plain ints in name spaces, not `IntEnum`s: they go into SQL parameters, numpy arrays and
protobuf fields as they are (pymysql would quote an `IntEnum` as a string).
"""

from __future__ import annotations

from google.protobuf import message_factory

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2


class TableState:
    """`Tables.state`: a dropped collection or partition is soft-deleted, purged later."""

    NORMAL = 0
    TO_DELETE = 1


class FileType:
    """`TableFiles.file_type`: a segment file's place in its life cycle."""

    NEW = 0  # being written from the insert buffer
    RAW = 1  # flushed raw segment
    TO_INDEX = 2  # raw, queued for an index build
    INDEX = 3  # built index file
    TO_DELETE = 4  # soft-deleted; the TTL cleaner purges it
    NEW_MERGE = 5  # merge or compaction output in progress
    NEW_INDEX = 6  # index-build output in progress
    BACKUP = 7  # raw file kept after its index was built (get-by-id, compaction)


SEARCHABLE_FILE_TYPES = (FileType.RAW, FileType.TO_INDEX, FileType.INDEX)
IN_PROGRESS_FILE_TYPES = (FileType.NEW, FileType.NEW_MERGE, FileType.NEW_INDEX)
"""Outputs still being written ("shadow files"): never searched, removed at a writer's start-up."""


class MetricType:
    """`Tables.metric_type` and `CollectionSchema.metric_type` (pymilvus MetricType)."""

    L2 = 1
    IP = 2
    HAMMING = 3
    JACCARD = 4
    TANIMOTO = 5
    SUBSTRUCTURE = 6
    SUPERSTRUCTURE = 7


METRIC_TYPES = frozenset(range(MetricType.L2, MetricType.SUPERSTRUCTURE + 1))
BINARY_METRICS = frozenset(range(MetricType.HAMMING, MetricType.SUPERSTRUCTURE + 1))
"""From HAMMING on a collection holds bit vectors (`binary_data`, dimension a multiple of 8)."""
MATCH_FILTER_METRICS = frozenset({MetricType.SUBSTRUCTURE, MetricType.SUPERSTRUCTURE})
"""Metrics that only filter: every match at distance 0.0, the first matches in storage order win."""
DESCENDING_METRICS = frozenset({MetricType.IP})
"""Larger is better for these; every other metric ranks ascending (smaller distance first)."""


def is_binary(metric: int) -> bool:
    return metric in BINARY_METRICS


def is_match_filter(metric: int) -> bool:
    return metric in MATCH_FILTER_METRICS


def is_descending(metric: int) -> bool:
    return metric in DESCENDING_METRICS


class IndexType:
    """`Tables.engine_type` / `TableFiles.engine_type` (Milvus EngineType); the values a client
    sends (pymilvus IndexType) are the same numbers, except the two binary engines."""

    FLAT = 1  # FAISS_IDMAP
    IVF_FLAT = 2
    IVF_SQ8 = 3
    RNSG = 4  # NSG
    IVF_SQ8H = 5  # GPU builds only
    IVF_PQ = 6
    BIN_FLAT = 9  # FAISS_BIN_IDMAP: what FLAT becomes on a binary collection
    BIN_IVF_FLAT = 10  # FAISS_BIN_IVFFLAT: what IVF_FLAT becomes on a binary collection
    HNSW = 11
    ANNOY = 12


CLIENT_INDEX_TYPES = frozenset(
    {
        IndexType.FLAT,
        IndexType.IVF_FLAT,
        IndexType.IVF_SQ8,
        IndexType.RNSG,
        IndexType.IVF_SQ8H,
        IndexType.IVF_PQ,
        IndexType.HNSW,
        IndexType.ANNOY,
    }
)
"""What CreateIndex accepts; 7 and 8 (SPTAG) and the binary engines 9 and 10 are server-internal."""
BINARY_ENGINE = {IndexType.FLAT: IndexType.BIN_FLAT, IndexType.IVF_FLAT: IndexType.BIN_IVF_FLAT}
"""The index types a binary collection accepts, and the engine the server stores for each."""
CLIENT_INDEX_TYPE = {engine: client for client, engine in BINARY_ENGINE.items()}
INDEX_NAMES = {
    IndexType.FLAT: "IDMAP",
    IndexType.IVF_FLAT: "IVFFLAT",
    IndexType.IVF_SQ8: "IVFSQ8",
    IndexType.RNSG: "NSG",
    IndexType.IVF_SQ8H: "IVFSQ8H",
    IndexType.IVF_PQ: "PQ",
    IndexType.BIN_FLAT: "BIN_IDMAP",
    IndexType.BIN_IVF_FLAT: "BIN_IVFFLAT",
    IndexType.HNSW: "HNSW",
    IndexType.ANNOY: "ANNOY",
}
"""`index_name` in ShowCollectionInfo's segment list, by engine type."""


def default_engine(metric: int) -> int:
    """What a new collection (or one whose index is dropped) stores: FLAT, BIN_FLAT when binary."""
    return IndexType.BIN_FLAT if is_binary(metric) else IndexType.FLAT


# ------------------------------------------------------------------------------- the gRPC service

SERVICE_NAME = "MilvusService"
SERVICE = f"milvus.grpc.{SERVICE_NAME}"
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name[SERVICE_NAME]

VECTOR_METHODS = (
    "CreateCollection",
    "HasCollection",
    "DescribeCollection",
    "CountCollection",
    "ShowCollections",
    "ShowCollectionInfo",
    "DropCollection",
    "CreateIndex",
    "DescribeIndex",
    "DropIndex",
    "CreatePartition",
    "HasPartition",
    "ShowPartitions",
    "DropPartition",
    "Insert",
    "GetVectorsByID",
    "GetVectorIDs",
    "Search",
    "SearchByID",
    "SearchInFiles",
    "Cmd",
    "DeleteByID",
    "PreloadCollection",
    "ReloadSegments",
    "Flush",
    "Compact",
)
"""The vector API the proxy serves: Milvus 0.9.1's 25 methods plus ReloadSegments (0.10). The
hybrid methods of the same service (CreateHybridCollection ...) are not served: gRPC answers
UNIMPLEMENTED for them, as Milvus 0.9.1 does."""
HYBRID_METHODS = tuple(m.name for m in SERVICE_DESCRIPTOR.methods if m.name not in VECTOR_METHODS)

REQUEST_CLASSES = {m.name: message_factory.GetMessageClass(m.input_type) for m in SERVICE_DESCRIPTOR.methods}
"""The request message class of every method of the service, by method name."""
REPLY_CLASSES = {m.name: message_factory.GetMessageClass(m.output_type) for m in SERVICE_DESCRIPTOR.methods}
"""The reply message class of every method of the service, by method name."""
STATUS_REPLY_METHODS = frozenset(name for name, reply in REPLY_CLASSES.items() if reply is status_pb2.Status)
"""Methods whose whole reply is a `Status` (the others carry one in field 1)."""


def method_path(method: str) -> str:
    """The HTTP/2 `:path` of a method of the service."""
    return f"/{SERVICE}/{method}"


def sql_list(values) -> str:
    """`(1, 2, 3)`: numbers for a literal SQL `IN` list."""
    return "(" + ", ".join(str(value) for value in values) + ")"

"""Collections and partitions: finding them by name, the calls that only change their meta rows,
and the checks every path shares (writes refused on a read-only node, vectors that do not fit).

Dropping a collection or a partition is not here: it is logged in the WAL and empties the insert
buffer, so it belongs to the write path (`writes.py`).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from utils import validation
from utils.errors import (
    IllegalCollectionName,
    IllegalDimension,
    IllegalRowRecord,
    PartitionError,
    UnexpectedError,
    collection_missing,
)
from utils.milvus_schema import INDEX_NAMES, default_engine, is_binary

from .meta import MetaStore, TableRow

MB = 1 << 20


class IdGenerator:
    """Milvus' scheme: microseconds since the epoch x 1000 + a counter, never going backwards."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> np.ndarray:
        with self._lock:
            start = max(self._last + 1, time.time_ns() // 1000 * 1000)
            self._last = start + count - 1
        return np.arange(start, start + count, dtype=np.int64)

    def one(self) -> str:
        return str(int(self.take(1)[0]))


def check_vectors(row: TableRow, vectors: np.ndarray) -> None:
    """Inserted or query vectors: not empty, of the collection's kind (float or binary) and dimension."""
    if vectors.shape[0] == 0:
        raise IllegalRowRecord("The vector array is empty. Make sure you have entered vector records.")
    binary = is_binary(row.metric_type)
    if binary != (vectors.dtype == np.uint8):
        kind = "binary" if binary else "float"
        raise IllegalRowRecord(f"Collection {row.table_id} holds {kind} vectors; the records carry the other kind")
    width = row.dimension // 8 if binary else row.dimension
    if vectors.shape[1] != width:
        got = vectors.shape[1] * 8 if binary else vectors.shape[1]
        raise IllegalDimension(
            f"The vector dimension must be equal to the collection dimension ({row.dimension}), got {got}"
        )


class Catalog:
    """The collections and partitions of the shared meta DB, as this node's role may see and change them."""

    def __init__(self, meta_store: MetaStore, role: str, ids: IdGenerator) -> None:
        self.meta = meta_store
        self.role = role
        self.ids = ids

    @property
    def writes(self) -> bool:
        return self.role != "readonly"

    def require_writer(self, what: str) -> None:
        if not self.writes:
            raise UnexpectedError(
                f"{what} is not allowed on a read-only node (deploy_mode cluster_readonly); "
                "send writes to the writable node"
            )

    # ------------------------------------------------------------------ lookups
    def collection(self, name: str) -> TableRow:
        validation.collection_name(name)
        row = self.meta.get_table(name)
        if row is None:
            raise collection_missing(name)
        if row.is_partition:
            raise IllegalCollectionName(collection_missing(name).reason)
        return row

    def family(self, name: str) -> list[TableRow]:
        """[collection, *its partitions] in one meta query; the search path's only table lookup."""
        validation.collection_name(name)
        rows = self.meta.family(name)
        own = [r for r in rows if r.table_id == name]
        if not own:
            raise collection_missing(name)
        if own[0].is_partition:
            raise IllegalCollectionName(collection_missing(name).reason)
        return own + [r for r in rows if r.owner_table == name]

    def tables(self, collection: TableRow) -> list[TableRow]:
        """The collection's own table and its partitions' tables."""
        return [collection] + self.meta.list_partitions(collection.table_id)

    def partition(self, name: str, tag: str) -> TableRow:
        tag = validation.partition_tag(tag)
        for partition in self.meta.list_partitions(name):
            if partition.partition_tag == tag:
                return partition
        raise PartitionError(f"Partition {tag} of collection {name} does not exist")

    # ------------------------------------------------------------------ collections
    def create_collection(self, name: str, dimension: int, index_file_size_mb: int, metric: int) -> None:
        self.require_writer("CreateCollection")
        validation.collection_name(name)
        validation.dimension(dimension, metric)
        validation.index_file_size(index_file_size_mb)
        validation.metric_type(metric)
        if self.meta.get_table(name) is not None:
            raise IllegalCollectionName(f"Collection {name} already exists")
        self.meta.insert_table(
            table_id=name,
            dimension=dimension,
            index_file_size=index_file_size_mb * MB,
            metric_type=metric,
            engine_type=default_engine(metric),
            index_params="{}",
        )

    def has_collection(self, name: str) -> bool:
        validation.collection_name(name)
        row = self.meta.get_table(name)
        return row is not None and not row.is_partition

    def list_collections(self) -> list[str]:
        return [row.table_id for row in self.meta.list_collections()]

    def count(self, name: str) -> int:
        row = self.collection(name)
        files = self.meta.files_of_tables(t.table_id for t in self.tables(row))
        return int(sum(f.row_count for f in files))

    def stats(self, name: str) -> dict:
        row = self.collection(name)
        tables = self.tables(row)
        files = self.meta.files_of_tables(t.table_id for t in tables)
        partitions = []
        for table in tables:
            segments = [
                {
                    "data_size": f.file_size,
                    "index_name": INDEX_NAMES.get(f.engine_type, str(f.engine_type)),
                    "name": f.segment_id,
                    "row_count": f.row_count,
                }
                for f in files
                if f.table_id == table.table_id
            ]
            partitions.append(
                {
                    "row_count": sum(s["row_count"] for s in segments),
                    "segments": segments,
                    "tag": table.partition_tag if table.is_partition else validation.DEFAULT_PARTITION_TAG,
                }
            )
        return {"partitions": partitions, "row_count": sum(p["row_count"] for p in partitions)}

    # ------------------------------------------------------------------ partitions
    def create_partition(self, name: str, tag: str) -> None:
        self.require_writer("CreatePartition")
        row = self.collection(name)
        tag = validation.partition_tag(tag)
        if tag == validation.DEFAULT_PARTITION_TAG:
            raise PartitionError("'_default' is built-in partition tag")
        partitions = self.meta.list_partitions(name)
        if any(p.partition_tag == tag for p in partitions):
            raise PartitionError(f"Duplicate partition is not allowed: {tag}")
        if len(partitions) >= validation.MAX_PARTITIONS:
            raise PartitionError(f"The number of partitions exceeds the upper limit({validation.MAX_PARTITIONS})")
        self.meta.insert_table(
            table_id=self.ids.one(),
            dimension=row.dimension,
            index_file_size=row.index_file_size,
            metric_type=row.metric_type,
            engine_type=row.engine_type,
            index_params=row.index_params,
            owner_table=name,
            partition_tag=tag,
            flag=row.flag,
        )

    def has_partition(self, name: str, tag: str) -> bool:
        self.collection(name)
        tag = validation.partition_tag(tag)
        if tag == validation.DEFAULT_PARTITION_TAG:
            return True
        return any(p.partition_tag == tag for p in self.meta.list_partitions(name))

    def list_partitions(self, name: str) -> list[str]:
        self.collection(name)
        return [validation.DEFAULT_PARTITION_TAG] + [p.partition_tag for p in self.meta.list_partitions(name)]

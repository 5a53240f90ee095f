"""The write path: the write-ahead log, the insert buffer, deletes and flush.

Milvus 0.9.1 semantics: inserted vectors wait in an in-memory buffer (invisible, uncounted) until
a flush writes them as a new segment (RAW file, or TO_INDEX when large enough for its index);
deletes are applied at flush by rewriting the segments' `deleted_docs`. Every insert, delete and
drop is appended to the WAL and fsynced before the reply, and replayed at start (`recover`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from utils import validation
from utils.errors import IllegalRowRecord, IllegalVectorId, PartitionError
from utils.milvus_schema import FileType

from . import crash_points, index, meta, wal
from .cache import SegmentCache
from .catalog import MB, Catalog, IdGenerator, check_vectors
from .meta import MetaStore, TableRow
from .reads import ReadPath
from .storage import SegmentData, SegmentStore

log = logging.getLogger(__name__)


def new_file_type(table: TableRow, size: int) -> int:
    """RAW, or TO_INDEX when the file reaches index_file_size and the index is not FLAT."""
    if size >= table.index_file_size and table.engine_type not in index.EXACT_TYPES:
        return FileType.TO_INDEX
    return FileType.RAW


@dataclass
class _Pending:
    """Unflushed inserts of one table; `lsn` is the WAL sequence number of the newest one."""

    ids: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    lsn: int = 0


class WritePath:
    """Inserts, deletes, drops and flushes of a node that writes (`single` or `writable`)."""

    def __init__(
        self,
        catalog: Catalog,
        reads: ReadPath,
        meta_store: MetaStore,
        store: SegmentStore,
        cache: SegmentCache,
        ids: IdGenerator,
        wal_path: str,
    ) -> None:
        """`wal_path` is opened only on a node that writes; on a read-only one every call here is refused."""
        self.catalog = catalog
        self.reads = reads
        self.meta = meta_store
        self.store = store
        self.cache = cache
        self.ids = ids
        self.wal = wal.WriteAheadLog(wal_path) if catalog.writes else None
        self._buffer: dict[str, _Pending] = {}  # table_id -> pending inserts
        self._deletes: dict[str, list[tuple[int, np.ndarray]]] = {}  # collection -> pending (lsn, deleted ids)
        self._buffer_lock = threading.Lock()  # one WAL append + buffer change at a time, and flush swaps
        self.flush_lock = threading.RLock()  # segment rows and deletion bitmaps change under it

    def recover(self) -> None:
        """Replay the WAL into the insert buffer (skipping what segments already hold), then flush."""
        replayed = 0
        table_lsn: dict[str, int] = {}
        for record in self.wal.replay():
            if record.kind == wal.INSERT:
                table_id = record.names[0]
                if table_id not in table_lsn:
                    table_lsn[table_id] = self.meta.max_flush_lsn(table_id)
                if record.lsn > table_lsn[table_id]:
                    self._buffer_insert(table_id, record.ids, record.vectors, record.lsn)
                    replayed += 1
            elif record.kind == wal.DELETE:
                row = self.meta.get_table(record.names[0])
                if row is not None:
                    table_ids = {t.table_id for t in self.catalog.tables(row)}
                    self._buffer_delete(record.names[0], table_ids, record.ids, record.lsn)
                    replayed += 1
            else:
                self._buffer_drop(record.names)
        self.wal.last_lsn = max(self.wal.last_lsn, self.meta.max_flush_lsn())
        self.flush([])
        log.info("WAL recovery: %d records replayed, last lsn %d", replayed, self.wal.last_lsn)

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()

    # ------------------------------------------------------------------ drops
    def drop_collection(self, name: str) -> None:
        self.catalog.require_writer("DropCollection")
        row = self.catalog.collection(name)
        tables = [row.table_id] + [p.table_id for p in self.meta.list_partitions(name)]
        with self._buffer_lock:
            self.wal.append(wal.DROP, tables)
            self._buffer_drop(tables)
            self._deletes.pop(name, None)
        self.meta.soft_delete_tables(tables)

    def drop_partition(self, name: str, tag: str) -> None:
        self.catalog.require_writer("DropPartition")
        self.catalog.collection(name)
        if validation.partition_tag(tag) == validation.DEFAULT_PARTITION_TAG:
            raise PartitionError("'_default' is built-in partition tag and cannot be dropped")
        partition = self.catalog.partition(name, tag)
        with self._buffer_lock:
            self.wal.append(wal.DROP, [partition.table_id])
            self._buffer_drop([partition.table_id])
        self.meta.soft_delete_tables([partition.table_id])

    # ------------------------------------------------------------------ inserts and deletes
    def insert(self, name: str, tag: str, vectors: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        self.catalog.require_writer("Insert")
        row = self.catalog.collection(name)
        check_vectors(row, vectors)
        if vectors.nbytes > validation.MAX_INSERT_BYTES:
            raise IllegalRowRecord(
                f"The amount of data inserted each time cannot exceed {validation.MAX_INSERT_BYTES // MB} MB"
            )
        target = self.catalog.partition(name, tag) if tag.strip() else row
        if ids is not None:
            if ids.shape[0] != vectors.shape[0]:
                raise IllegalVectorId(
                    f"The size of vector ID array ({ids.shape[0]}) must be equal to the size of the vector "
                    f"array ({vectors.shape[0]})"
                )
            if (ids < 0).any():
                raise IllegalVectorId("Vector ids must not be negative")
        self._fix_id_mode(row, user_ids=ids is not None)
        if ids is None:
            ids = self.ids.take(vectors.shape[0])
        with self._buffer_lock:  # the WAL order is the buffer order
            lsn = self.wal.append(wal.INSERT, [target.table_id], ids, vectors)
            self._buffer_insert(target.table_id, ids, vectors, lsn)
        return ids

    def delete(self, name: str, ids: np.ndarray) -> None:
        self.catalog.require_writer("DeleteByID")
        row = self.catalog.collection(name)
        if ids.size == 0:
            raise IllegalVectorId("The id array is empty")
        table_ids = {t.table_id for t in self.catalog.tables(row)}
        with self._buffer_lock:
            lsn = self.wal.append(wal.DELETE, [name], ids)
            self._buffer_delete(name, table_ids, ids, lsn)

    def _buffer_insert(self, table_id: str, ids: np.ndarray, vectors: np.ndarray, lsn: int) -> None:
        pending = self._buffer.setdefault(table_id, _Pending())
        pending.ids.append(ids)
        pending.vectors.append(vectors)
        pending.lsn = lsn

    def _buffer_delete(self, collection: str, table_ids: set[str], ids: np.ndarray, lsn: int) -> None:
        """Drop the ids from unflushed inserts and queue the delete for flushed segments."""
        for table_id in table_ids & self._buffer.keys():
            pending = self._buffer[table_id]
            keep = [~np.isin(chunk, ids) for chunk in pending.ids]
            pending.ids = [c[k] for c, k in zip(pending.ids, keep, strict=True)]
            pending.vectors = [v[k] for v, k in zip(pending.vectors, keep, strict=True)]
        self._deletes.setdefault(collection, []).append((lsn, ids))

    def _buffer_drop(self, table_ids: Sequence[str]) -> None:
        for table_id in table_ids:
            self._buffer.pop(table_id, None)

    def _fix_id_mode(self, row: TableRow, user_ids: bool) -> None:
        flag = row.flag  # read by the caller a moment ago; no second meta query per insert
        if user_ids and flag & meta.FLAG_NO_USERID:
            raise IllegalVectorId(
                "Entities IDs are auto-generated. All vectors of this collection must use auto-generated IDs."
            )
        if not user_ids and flag & meta.FLAG_HAS_USERID:
            raise IllegalVectorId(
                "Entities IDs are user-defined. Please provide IDs for all vectors of this collection."
            )
        if not flag & (meta.FLAG_NO_USERID | meta.FLAG_HAS_USERID):
            self.meta.set_flag(row.table_id, flag | (meta.FLAG_HAS_USERID if user_ids else meta.FLAG_NO_USERID))

    # ------------------------------------------------------------------ flush
    def flush(self, names: Sequence[str]) -> None:
        """Write buffered inserts as new segments and apply pending deletes; blocks until done.

        Named or not, a flush writes every buffer: the WAL files it retires hold records of all
        collections, and flushing more than asked is invisible to clients.
        """
        self.catalog.require_writer("Flush")
        for name in names:
            self.catalog.collection(name)
        with self.flush_lock:
            with self._buffer_lock:
                buffers, self._buffer = self._buffer, {}
                deletes, self._deletes = self._deletes, {}
                covered = self.wal.rotate()
            for collection, chunks in deletes.items():
                self._apply_deletes(collection, chunks)
            for table_id, pending in buffers.items():
                if pending.ids and sum(c.size for c in pending.ids):
                    self._write_segment(
                        table_id, np.concatenate(pending.ids), np.concatenate(pending.vectors), pending.lsn
                    )
            if buffers or deletes:
                crash_points.reached("flush.before_wal_retire")
            self.wal.retire(covered)

    def _write_segment(self, table_id: str, ids: np.ndarray, vectors: np.ndarray, lsn: int) -> None:
        table = self.meta.get_table(table_id)
        if table is None:  # dropped while buffered
            return
        segment_id = self.ids.one()
        size = self.store.write_segment(table_id, segment_id, segment_id, ids, vectors)
        crash_points.reached("flush.segment_written")
        row = self.meta.add_file(
            table_id=table_id,
            segment_id=segment_id,
            file_id=segment_id,
            file_type=new_file_type(table, size),
            engine_type=table.engine_type,
            file_size=size,
            row_count=int(ids.size),
            flush_lsn=lsn,
        )
        self.cache.put(row.id, SegmentData(ids, vectors, np.zeros(ids.size, dtype=bool)))

    def _apply_deletes(self, collection: str, chunks: list[tuple[int, np.ndarray]]) -> None:
        """Mark deleted rows in `deleted_docs`; a delete reaches only segments older than it (by LSN)."""
        row = self.meta.get_table(collection)
        if row is None:
            return
        for file in self.meta.files_of_tables(t.table_id for t in self.catalog.tables(row)):
            applicable = [ids for lsn, ids in chunks if lsn > file.flush_lsn]
            if not applicable:
                continue
            segment = self.reads.segment(file, row)
            hit = np.isin(segment.ids, np.concatenate(applicable)) & ~segment.deleted
            if not hit.any():
                continue
            deleted = segment.deleted | hit
            self.store.write_deleted(file.table_id, file.segment_id, deleted)
            live = int(deleted.size - np.count_nonzero(deleted))
            self.meta.update_segment_rows(file.table_id, file.segment_id, live)
            self.cache.set_deleted(file.id, deleted)

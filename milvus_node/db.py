"""The node's database: collections, partitions, the insert buffer, flush, deletes and search.

Milvus 0.9.1 semantics: inserted vectors wait in an in-memory buffer (invisible, uncounted)
until a flush writes them as a new segment (RAW file); deletes are applied at flush by
rewriting the segment's `deleted_docs`; searches read only flushed, searchable files. The role
decides what this node may do: `readonly` never writes meta or files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from utils import validation
from utils.errors import (
    CacheFailed,
    IllegalArgument,
    IllegalCollectionName,
    IllegalDimension,
    IllegalIndexType,
    IllegalRowRecord,
    IllegalVectorId,
    MilvusError,
    PartitionError,
    UnexpectedError,
    collection_missing,
)

from . import engine, index, meta, wal
from .cache import SegmentCache
from .config import RuntimeConfig
from .meta import FileRow, MetaStore, TableRow
from .storage import SegmentData, SegmentStore

log = logging.getLogger(__name__)

GB = 1 << 30
MB = 1 << 20
BINARY_ENGINE = {1: 9, 2: 10}  # FLAT / IVF_FLAT -> FAISS_BIN_IDMAP / FAISS_BIN_IVFFLAT
CLIENT_INDEX_TYPE = {9: 1, 10: 2}
INDEX_NAMES = {
    1: "IDMAP",
    2: "IVFFLAT",
    3: "IVFSQ8",
    4: "NSG",
    5: "IVFSQ8H",
    6: "PQ",
    9: "BIN_IDMAP",
    10: "BIN_IVFFLAT",
    11: "HNSW",
    12: "ANNOY",
}
TTL_SECONDS = {"single": 10, "writable": 3600}
UNAVAILABLE_INDEX_TYPES = (index.IVF_SQ8H,)  # GPU-only: not served by this CPU node
BUILD_INDEX_THRESHOLD = 4096  # CreateIndex queues every RAW file with at least this many rows
MAX_GET_IDS = 1000  # GetVectorsByID's id array cap
MAINTENANCE_PERIOD_S = 1.0  # Milvus' index thread cadence; merges run on the same beat

# Test hook for crash tests: `MILVUS_NODE_CRASH_AT=<point>` makes the process SIGKILL itself at that
# point, so a test can kill -9 the node exactly during a flush, an index build or a compaction.
_CRASH_AT = os.environ.get("MILVUS_NODE_CRASH_AT", "")


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        log.error("crash point %s reached: SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)


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


@dataclass
class _Pending:
    """Unflushed inserts of one table; `lsn` is the WAL sequence number of the newest one."""

    ids: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    lsn: int = 0


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # int64 (nq, k), -1 padded; (0, 0) when nothing was searchable
    distances: np.ndarray  # float32, same shape


class NodeDB:
    def __init__(
        self, meta_store: MetaStore, store: SegmentStore, role: str, config: RuntimeConfig, merge_after_s: float = 10.0
    ) -> None:
        self.meta = meta_store
        self.store = store
        self.role = role
        self.config = config
        self.merge_after_s = merge_after_s  # RAW files unchanged this long are merge candidates; < 0: never
        self.cache = SegmentCache(config.get_int("cache_config.cpu_cache_capacity") * GB)
        config.on_change("cache_config.cpu_cache_capacity", lambda v: self.cache.resize(int(v) * GB))
        self.ids = IdGenerator()
        self.wal = wal.WriteAheadLog(config.get("wal_config.wal_path")) if role != "readonly" else None
        self._buffer: dict[str, _Pending] = {}  # table_id -> pending inserts
        self._deletes: dict[str, list[tuple[int, np.ndarray]]] = {}  # collection -> pending (lsn, deleted ids)
        self._buffer_lock = threading.Lock()  # one WAL append + buffer change at a time, and flush swaps
        self._flush_lock = threading.RLock()  # segment rows and deletion bitmaps change under it
        self._maintenance_lock = threading.RLock()  # index builds, merges and compactions, one at a time
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def writes(self) -> bool:
        return self.role != "readonly"

    def start(self) -> None:
        self.meta.ensure_schema(create=self.writes)
        if self.writes:
            for row in self.meta.delete_shadow_files():
                self._remove_file_artifacts(row, whole_segment=row.file_id == row.segment_id)
            self.store.remove_stale_temp_dirs()
            for orphan in self.store.remove_orphan_segments(self.meta.segment_keys()):
                log.warning(
                    "removed segment dir %s: no meta row refers to it (crash before its flush committed)", orphan
                )
            self._recover()
            for target, name in ((self._flush_loop, "flush-and-clean"), (self._maintenance_loop, "index-and-merge")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.writes:
            try:
                self.flush([])
            except MilvusError as exc:
                log.error("final flush failed: %s", exc.reason)
            self.wal.close()

    def _recover(self) -> None:
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
                    self._buffer_delete(
                        record.names[0], {t.table_id for t in self._tables(row)}, record.ids, record.lsn
                    )
                    replayed += 1
            else:
                self._buffer_drop(record.names)
        self.wal.last_lsn = max(self.wal.last_lsn, self.meta.max_flush_lsn())
        self.flush([])
        log.info("WAL recovery: %d records replayed, last lsn %d", replayed, self.wal.last_lsn)

    def _flush_loop(self) -> None:
        last_flush = last_clean = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            interval = self.config.get_int("db_config.auto_flush_interval")
            try:
                if interval > 0 and now - last_flush >= interval:
                    last_flush = now
                    self.flush([])
                if now - last_clean >= 1.0:
                    last_clean = now
                    self._clean()
            except Exception:  # the loop must survive a meta DB hiccup
                log.exception("background flush/clean failed")

    def _maintenance_loop(self) -> None:
        while not self._stop.wait(MAINTENANCE_PERIOD_S):
            try:
                self._build_pending_indexes(None)
                self._merge_small_files()
            except Exception:  # the loop must survive a meta DB hiccup
                log.exception("background index build/merge failed")

    def _clean(self) -> None:
        """Hard-delete TO_DELETE files past their TTL, then soft-deleted table rows with no files."""
        horizon = meta.now_us() - TTL_SECONDS[self.role] * 1_000_000
        stale = self.meta.files_to_purge(horizon)
        self.meta.delete_file_rows([row.id for row in stale])
        for row in stale:
            self.cache.discard(row.id)
            self._remove_file_artifacts(row, whole_segment=not self.meta.segment_has_rows(row.table_id, row.segment_id))
        self.meta.purge_deleted_tables()

    def _remove_file_artifacts(self, row: FileRow, whole_segment: bool) -> None:
        """An index file is one file in its segment dir; the dir goes once no row of the segment is left."""
        if row.file_id != row.segment_id:
            self.store.remove_index_file(row.table_id, row.segment_id, row.file_id)
        if whole_segment:
            self.store.remove_segment(row.table_id, row.segment_id)

    def _require_writer(self, what: str) -> None:
        if not self.writes:
            raise UnexpectedError(
                f"{what} is not allowed on a read-only node (deploy_mode cluster_readonly); "
                "send writes to the writable node"
            )

    # ------------------------------------------------------------------ collections
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

    def create_collection(self, name: str, dimension: int, index_file_size_mb: int, metric: int) -> None:
        self._require_writer("CreateCollection")
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
            engine_type=9 if engine.is_binary(metric) else 1,
            index_params="{}",
        )

    def has_collection(self, name: str) -> bool:
        validation.collection_name(name)
        row = self.meta.get_table(name)
        return row is not None and not row.is_partition

    def list_collections(self) -> list[str]:
        return [row.table_id for row in self.meta.list_collections()]

    def drop_collection(self, name: str) -> None:
        self._require_writer("DropCollection")
        row = self.collection(name)
        tables = [row.table_id] + [p.table_id for p in self.meta.list_partitions(name)]
        with self._buffer_lock:
            self.wal.append(wal.DROP, tables)
            self._buffer_drop(tables)
            self._deletes.pop(name, None)
        self.meta.soft_delete_tables(tables)

    def _tables(self, collection: TableRow) -> list[TableRow]:
        return [collection] + self.meta.list_partitions(collection.table_id)

    def count(self, name: str) -> int:
        row = self.collection(name)
        files = self.meta.files_of_tables(t.table_id for t in self._tables(row))
        return int(sum(f.row_count for f in files))

    def stats(self, name: str) -> dict:
        row = self.collection(name)
        tables = self._tables(row)
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
        self._require_writer("CreatePartition")
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

    def _partition(self, name: str, tag: str) -> TableRow:
        tag = validation.partition_tag(tag)
        for partition in self.meta.list_partitions(name):
            if partition.partition_tag == tag:
                return partition
        raise PartitionError(f"Partition {tag} of collection {name} does not exist")

    def drop_partition(self, name: str, tag: str) -> None:
        self._require_writer("DropPartition")
        self.collection(name)
        if validation.partition_tag(tag) == validation.DEFAULT_PARTITION_TAG:
            raise PartitionError("'_default' is built-in partition tag and cannot be dropped")
        partition = self._partition(name, tag)
        with self._buffer_lock:
            self.wal.append(wal.DROP, [partition.table_id])
            self._buffer_drop([partition.table_id])
        self.meta.soft_delete_tables([partition.table_id])

    # ------------------------------------------------------------------ writes
    def insert(self, name: str, tag: str, vectors: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        self._require_writer("Insert")
        row = self.collection(name)
        self._check_vectors(row, vectors)
        if vectors.nbytes > validation.MAX_INSERT_BYTES:
            raise IllegalRowRecord(
                f"The amount of data inserted each time cannot exceed {validation.MAX_INSERT_BYTES // MB} MB"
            )
        target = self._partition(name, tag) if tag.strip() else row
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

    def _check_vectors(self, row: TableRow, vectors: np.ndarray) -> None:
        if vectors.shape[0] == 0:
            raise IllegalRowRecord("The vector array is empty. Make sure you have entered vector records.")
        binary = engine.is_binary(row.metric_type)
        if binary != (vectors.dtype == np.uint8):
            kind = "binary" if binary else "float"
            raise IllegalRowRecord(f"Collection {row.table_id} holds {kind} vectors; the records carry the other kind")
        width = row.dimension // 8 if binary else row.dimension
        if vectors.shape[1] != width:
            got = vectors.shape[1] * 8 if binary else vectors.shape[1]
            raise IllegalDimension(
                f"The vector dimension must be equal to the collection dimension ({row.dimension}), got {got}"
            )

    def delete(self, name: str, ids: np.ndarray) -> None:
        self._require_writer("DeleteByID")
        row = self.collection(name)
        if ids.size == 0:
            raise IllegalVectorId("The id array is empty")
        table_ids = {t.table_id for t in self._tables(row)}
        with self._buffer_lock:
            lsn = self.wal.append(wal.DELETE, [name], ids)
            self._buffer_delete(name, table_ids, ids, lsn)

    def flush(self, names: Sequence[str]) -> None:
        """Write buffered inserts as new segments and apply pending deletes; blocks until done.

        Named or not, a flush writes every buffer: the WAL files it retires hold records of all
        collections, and flushing more than asked is invisible to clients.
        """
        self._require_writer("Flush")
        for name in names:
            self.collection(name)
        with self._flush_lock:
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
                crash_point("flush.before_wal_retire")
            self.wal.retire(covered)

    def _new_file_type(self, table: TableRow, size: int) -> int:
        """RAW, or TO_INDEX when the file reaches index_file_size and the index is not FLAT."""
        if size >= table.index_file_size and table.engine_type not in index.EXACT_TYPES:
            return meta.TO_INDEX
        return meta.RAW

    def _write_segment(self, table_id: str, ids: np.ndarray, vectors: np.ndarray, lsn: int) -> None:
        table = self.meta.get_table(table_id)
        if table is None:  # dropped while buffered
            return
        segment_id = self.ids.one()
        size = self.store.write_segment(table_id, segment_id, segment_id, ids, vectors)
        crash_point("flush.segment_written")
        row = self.meta.add_file(
            table_id=table_id,
            segment_id=segment_id,
            file_id=segment_id,
            file_type=self._new_file_type(table, size),
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
        for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
            applicable = [ids for lsn, ids in chunks if lsn > file.flush_lsn]
            if not applicable:
                continue
            segment = self._segment(file, row)
            hit = np.isin(segment.ids, np.concatenate(applicable)) & ~segment.deleted
            if not hit.any():
                continue
            deleted = segment.deleted | hit
            self.store.write_deleted(file.table_id, file.segment_id, deleted)
            live = int(deleted.size - np.count_nonzero(deleted))
            self.meta.update_segment_rows(file.table_id, file.segment_id, live)
            self.cache.set_deleted(file.id, deleted)

    def compact(self, name: str) -> None:
        """Rewrite segments that carry deletions (NEW_MERGE -> RAW/TO_INDEX); the old segment's files
        (raw, index, backup) become TO_DELETE in the same transaction."""
        self._require_writer("Compact")
        row = self.collection(name)
        self.flush([name])
        tables = {t.table_id: t for t in self._tables(row)}
        with self._maintenance_lock, self._flush_lock:
            for file in self.meta.files_of_tables(tables):
                segment = self._segment(file, row)
                if not segment.deleted.any():
                    continue
                retired = self.meta.segment_file_ids(file.table_id, file.segment_id)
                live = ~segment.deleted
                self._rewrite(
                    tables[file.table_id],
                    segment.ids[live],
                    segment.vectors[live],
                    file.flush_lsn,
                    retired,
                    "compact.new_file_written",
                )

    def _rewrite(
        self, table: TableRow, ids: np.ndarray, vectors: np.ndarray, lsn: int, retired: list[int], point: str
    ) -> None:
        """Publish rows as one new segment (via NEW_MERGE) and retire `retired` in one transaction."""
        new_ids, new_type = [], meta.RAW
        if ids.size:
            segment_id = self.ids.one()
            size = self.store.write_segment(table.table_id, segment_id, segment_id, ids, vectors)
            new_row = self.meta.add_file(
                table_id=table.table_id,
                segment_id=segment_id,
                file_id=segment_id,
                file_type=meta.NEW_MERGE,
                engine_type=table.engine_type,
                file_size=size,
                row_count=int(ids.size),
                flush_lsn=lsn,
            )
            crash_point(point)
            new_ids, new_type = [new_row.id], self._new_file_type(table, size)
        self.meta.replace_files(new_ids, retired, new_type)
        for file_id in retired:
            self.cache.discard(file_id)

    def _merge_small_files(self) -> None:
        """Combine RAW files below index_file_size, unchanged for `merge_after_s`, up to that size."""
        if self.merge_after_s < 0:
            return
        horizon = meta.now_us() - int(self.merge_after_s * 1_000_000)
        by_table: dict[str, list[FileRow]] = {}
        for file in self.meta.files_of_types([meta.RAW]):
            if file.updated_time <= horizon:
                by_table.setdefault(file.table_id, []).append(file)
        for table_id, files in by_table.items():
            table = self.meta.get_table(table_id)
            if table is None:
                continue
            small = [f for f in files if f.file_size < table.index_file_size]
            batch, total = [], 0
            for file in small:
                batch.append(file)
                total += file.file_size
                if total >= table.index_file_size:
                    self._merge(table, batch)
                    batch, total = [], 0
            if len(batch) >= 2:
                self._merge(table, batch)

    def _merge(self, table: TableRow, files: list[FileRow]) -> None:
        with self._maintenance_lock, self._flush_lock:
            current = {f.id for f in self.meta.files_by_ids([f.id for f in files]) if f.file_type == meta.RAW}
            files = [f for f in files if f.id in current]  # a compaction or drop may have won the race
            if len(files) < 2:
                return
            segments = [self._segment(f, table) for f in files]
            ids = np.concatenate([s.ids[~s.deleted] for s in segments])
            vectors = np.concatenate([s.vectors[~s.deleted] for s in segments])
            self._rewrite(
                table, ids, vectors, max(f.flush_lsn for f in files), [f.id for f in files], "merge.new_file_written"
            )
        log.info("merged %d files of %s into one of %d rows", len(files), table.table_id, ids.size)

    # ------------------------------------------------------------------ index
    def create_index(self, name: str, index_type: int, params: dict) -> None:
        """Validate, flush, record the index, build every RAW file of at least BUILD_INDEX_THRESHOLD rows
        (whatever its size: 0.9.1's rule; smaller files stay RAW and are searched raw), then return."""
        self._require_writer("CreateIndex")
        row = self.collection(name)
        validation.index_type(index_type)
        binary = engine.is_binary(row.metric_type)
        if binary and index_type not in (1, 2):
            raise IllegalIndexType("Invalid index type for collection metric type")
        if index_type in UNAVAILABLE_INDEX_TYPES:
            raise IllegalIndexType(f"Unsupported index type: {index_type}")
        engine_type = BINARY_ENGINE[index_type] if binary else index_type
        index.check_index_params(engine_type, row.dimension, params)
        self.flush([name])
        params_json = json.dumps(params, separators=(",", ":"))
        tables = [t.table_id for t in self._tables(row)]
        with self._maintenance_lock:
            if (row.engine_type, row.index_params) != (engine_type, params_json):
                self._discard(self.meta.drop_index_files(tables, engine_type))
                self.meta.set_index(name, engine_type, params_json)
            if engine_type not in index.EXACT_TYPES:
                self.meta.mark_to_index(tables, BUILD_INDEX_THRESHOLD)
                self._build_pending_indexes(tables)

    def describe_index(self, name: str) -> tuple[int, str]:
        row = self.collection(name)
        return CLIENT_INDEX_TYPE.get(row.engine_type, row.engine_type), row.index_params or "{}"

    def drop_index(self, name: str) -> None:
        """Back to FLAT: index files retire, their raw backups become RAW (searchable) again."""
        self._require_writer("DropIndex")
        row = self.collection(name)
        flat = index.BIN_FLAT if engine.is_binary(row.metric_type) else index.FLAT
        with self._maintenance_lock:
            self._discard(self.meta.drop_index_files([t.table_id for t in self._tables(row)], flat))
            self.meta.set_index(name, flat, "{}")

    def _discard(self, file_ids: Sequence[int]) -> None:
        for file_id in file_ids:
            self.cache.discard(file_id)

    def _build_pending_indexes(self, table_ids: Sequence[str] | None) -> None:
        """Build every TO_INDEX file (of `table_ids`, or of all tables): Milvus' index thread."""
        with self._maintenance_lock:
            for file in self.meta.files_of_types([meta.TO_INDEX], table_ids):
                self._build_index(file)

    def _build_index(self, source: FileRow) -> None:
        """TO_INDEX -> (NEW_INDEX while building) -> INDEX, with the raw file kept as BACKUP."""
        table = self.meta.get_table(source.table_id)
        if table is None:
            return
        if table.engine_type in index.EXACT_TYPES:
            self.meta.set_file_type([source.id], meta.RAW)
            return
        segment = self._segment(source, table)
        new_row = self.meta.add_file(
            table_id=source.table_id,
            segment_id=source.segment_id,
            file_id=self.ids.one(),
            file_type=meta.NEW_INDEX,
            engine_type=table.engine_type,
            file_size=0,
            row_count=source.row_count,
            flush_lsn=source.flush_lsn,
        )
        path = self.store.index_path(source.table_id, source.segment_id, new_row.file_id)
        started = time.monotonic()
        try:
            built = index.build(table.engine_type, table.metric_type, segment.vectors, json.loads(table.index_params))
            size = index.write(built, path)
        except Exception:  # a segment faiss cannot index (e.g. too few rows for PQ) stays searchable raw
            log.exception("index build of file %d (%s) failed; it stays RAW", source.id, table.table_id)
            self.meta.delete_file_rows([new_row.id])
            self.store.remove_index_file(source.table_id, source.segment_id, new_row.file_id)
            self.meta.set_file_type([source.id], meta.RAW)
            return
        crash_point("index.file_written")
        if self.meta.publish_index(new_row.id, source.id, size):
            self.cache.discard(source.id)
            log.info(
                "built %s index of file %d (%d rows) in %.2f s",
                INDEX_NAMES.get(table.engine_type),
                source.id,
                segment.ids.size,
                time.monotonic() - started,
            )

    # ------------------------------------------------------------------ reads
    def _segment(self, file: FileRow, table: TableRow) -> SegmentData:
        """A file's rows from its segment's raw file (file_id = segment_id), plus its index if it is one."""

        def load() -> SegmentData:
            data = self.store.load_segment(
                file.table_id, file.segment_id, file.segment_id, table.dimension, engine.is_binary(table.metric_type)
            )
            if file.file_type == meta.INDEX and file.engine_type not in index.EXACT_TYPES:
                data.index = index.load(
                    file.engine_type,
                    self.store.index_path(file.table_id, file.segment_id, file.file_id),
                    table.dimension,
                    table.metric_type,
                )
            return data

        return self.cache.get(file.id, load)

    def preload(self, name: str) -> None:
        row = self.collection(name)
        files = self.meta.files_of_tables(t.table_id for t in self._tables(row))
        width = row.dimension // 8 if engine.is_binary(row.metric_type) else row.dimension * 4
        needed = sum(f.row_count * (width + 9) for f in files)
        if needed > self.cache.capacity_bytes:
            raise CacheFailed(
                f"Cannot preload collection {name}: it needs {needed} bytes but the cache holds "
                f"{self.cache.capacity_bytes} (cache_config.cpu_cache_capacity)"
            )
        for file in files:
            self._segment(file, row)

    def get_vectors(self, name: str, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        """GetVectorsByID: one entry per id in request order, None for ids that are not flushed or
        deleted; at most MAX_GET_IDS ids per request, as 0.9.1 allows."""
        row = self.collection(name)
        if ids.size > MAX_GET_IDS:
            raise IllegalArgument(f"Input id array size cannot exceed: {MAX_GET_IDS}")
        return self._vectors_by_id(row, ids)

    def _vectors_by_id(self, row: TableRow, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        if ids.size == 0:
            raise IllegalVectorId("The id array is empty")
        found: list[np.ndarray | None] = [None] * ids.size
        for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
            segment = self._segment(file, row)
            live = ~segment.deleted
            live_ids = segment.ids[live]
            hit = np.isin(ids, live_ids)
            if not hit.any():
                continue
            order = np.argsort(live_ids)
            rows = order[np.searchsorted(live_ids[order], ids[hit])]
            live_vectors = segment.vectors[live]
            for position, row_index in zip(np.flatnonzero(hit), rows, strict=True):
                found[position] = live_vectors[row_index]
        return engine.is_binary(row.metric_type), found

    def segment_ids(self, name: str, segment_name: str) -> np.ndarray:
        row = self.collection(name)
        for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
            if file.segment_id == segment_name:
                segment = self._segment(file, row)
                return segment.ids[~segment.deleted]
        raise UnexpectedError(f"Segment {segment_name} of collection {name} does not exist")

    def search(
        self, family: list[TableRow], tags: Sequence[str], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        row = self._search_checks(family, queries, topk, params)
        partitions = [(p.table_id, p.partition_tag) for p in family[1:]]
        files = self.meta.files_of_tables(validation.select_tables(row.table_id, partitions, list(tags)))
        return self._search_files(row, files, queries, topk, params)

    def search_in_files(
        self, family: list[TableRow], file_ids: Sequence[str], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        row = self._search_checks(family, queries, topk, params)
        rows = self.meta.files_by_ids(validation.file_ids(list(file_ids)))
        if not rows:
            raise UnexpectedError("Invalid file id")
        # A file the caller routed may have been merged, compacted or indexed since it read the meta
        # DB: its rows stay on disk until the TTL cleaner runs, so search it as Milvus does rather than
        # return a result missing those rows. Only files still being written are left out.
        own = {t.table_id for t in family}
        usable = [f for f in rows if f.table_id in own and f.file_type not in meta.IN_PROGRESS_FILE_TYPES]
        if len(usable) != len(rows):
            log.warning(
                "SearchInFiles on %s skipped files %s (being written, or not in the collection)",
                row.table_id,
                sorted({f.id for f in rows} - {f.id for f in usable}),
            )
        return self._search_files(row, usable, queries, topk, params)

    def search_by_ids(self, name: str, tags: Sequence[str], ids: np.ndarray, topk: int, params: dict) -> SearchResult:
        """One row per id, as wide as the search of the found ids (min(topk, live rows searched));
        ids that are not stored get a row of padding. Nothing found, or no live row: an empty reply."""
        family = self.family(name)
        row = family[0]
        validation.topk(topk)
        index.check_search_params(row.engine_type, topk, params)  # also when no id is found
        _, vectors = self._vectors_by_id(row, ids)
        known = [i for i, v in enumerate(vectors) if v is not None]
        if not known:
            return SearchResult(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        result = self.search(family, tags, np.stack([vectors[i] for i in known]), topk, params)
        width = result.ids.shape[1]
        if width == 0:
            return result
        out_ids = np.full((ids.size, width), -1, dtype=np.int64)
        out_dist = np.full((ids.size, width), engine.pad_distance(row.metric_type), dtype=np.float32)
        out_ids[known] = result.ids
        out_dist[known] = result.distances
        return SearchResult(out_ids, out_dist)

    def reload_segments(self, name: str, file_ids: Sequence[str]) -> None:
        """Refresh the deletion bitmaps of cached files from disk (what 0.10 read-only nodes do)."""
        self.collection(name)
        for file in self.meta.files_by_ids(validation.file_ids(list(file_ids), "segment id", IllegalArgument)):
            cached = self.cache.peek(file.id)
            if cached is not None:
                self.cache.set_deleted(
                    file.id, self.store.load_deleted(file.table_id, file.segment_id, cached.ids.size)
                )

    def _search_checks(self, family: list[TableRow], queries: np.ndarray, topk: int, params: dict) -> TableRow:
        """topk, then the search parameters against the collection's CURRENT index type, then vectors."""
        row = family[0]
        validation.topk(topk)
        index.check_search_params(row.engine_type, topk, params)
        self._check_vectors(row, queries)
        return row

    def _search_files(
        self, row: TableRow, files: Sequence[FileRow], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        """Milvus' reply width: each file gives min(its live rows, topk) columns and the files merge to
        min(topk, their sum), so a reply is min(topk, live rows searched) wide, (0, 0) with none."""
        match_filter = engine.is_match_filter(row.metric_type)
        parts, candidate_ids, candidate_dist = [], [], []
        live_rows = 0
        for file in files:  # in file order: a match filter keeps its first matches in storage order
            segment = self._segment(file, row)
            live_rows += segment.live_count
            if not segment.live_count:
                continue
            if segment.index is not None:
                found, dist = index.search(
                    segment.index, row.metric_type, queries, segment.vectors, segment.ids, segment.deleted, topk, params
                )
                if match_filter:
                    parts.append(engine.first_matches(dist, found, topk, row.metric_type))
                else:
                    candidate_ids.append(found)
                    candidate_dist.append(dist)
            else:
                parts.append(
                    engine.search_block(
                        row.metric_type, queries, segment.vectors, segment.ids, segment.deleted, topk, segment.norms
                    )
                )
        width = min(topk, live_rows)
        if width == 0:
            return SearchResult(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        if candidate_ids:  # one ranking over every indexed segment's candidates
            parts.append(engine.select_topk(np.hstack(candidate_dist), np.hstack(candidate_ids), topk, row.metric_type))
        ids, dist = engine.merge_topk(parts, queries.shape[0], topk, row.metric_type)
        return SearchResult(np.ascontiguousarray(ids[:, :width]), dist[:, :width].astype(np.float32))

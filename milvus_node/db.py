"""The node's database: collections, partitions, the insert buffer, flush, deletes and search.

Milvus 0.9.1 semantics: inserted vectors wait in an in-memory buffer (invisible, uncounted)
until a flush writes them as a new segment (RAW file); deletes are applied at flush by
rewriting the segment's `deleted_docs`; searches read only flushed, searchable files. The role
decides what this node may do: `readonly` never writes meta or files.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from utils.errors import (
    CacheFailed, IllegalArgument, IllegalCollectionName, IllegalDimension, IllegalIndexType,
    IllegalRowRecord, IllegalVectorId, MilvusError, PartitionError, UnexpectedError,
    collection_missing,
)

from utils import validation

from . import engine, meta
from .cache import SegmentCache
from .config import RuntimeConfig
from .meta import FileRow, MetaStore, TableRow
from .storage import SegmentData, SegmentStore

log = logging.getLogger(__name__)

GB = 1 << 30
MB = 1 << 20
BINARY_ENGINE = {1: 9, 2: 10}  # FLAT / IVF_FLAT -> FAISS_BIN_IDMAP / FAISS_BIN_IVFFLAT
CLIENT_INDEX_TYPE = {9: 1, 10: 2}
INDEX_NAMES = {1: "IDMAP", 2: "IVFFLAT", 3: "IVFSQ8", 4: "NSG", 5: "IVFSQ8H", 6: "PQ", 9: "BIN_IDMAP",
               10: "BIN_IVFFLAT", 11: "HNSW", 12: "ANNOY"}
TTL_SECONDS = {"single": 10, "writable": 3600}


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
    """Unflushed inserts of one table and unflushed deletes of one collection."""

    ids: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # int64 (nq, k), -1 padded; (0, 0) when nothing was searchable
    distances: np.ndarray  # float32, same shape


class NodeDB:
    def __init__(self, meta_store: MetaStore, store: SegmentStore, role: str, config: RuntimeConfig) -> None:
        self.meta = meta_store
        self.store = store
        self.role = role
        self.config = config
        self.cache = SegmentCache(config.get_int("cache_config.cpu_cache_capacity") * GB)
        config.on_change("cache_config.cpu_cache_capacity", lambda v: setattr(self.cache, "capacity_bytes", int(v) * GB))
        self.ids = IdGenerator()
        self._buffer: dict[str, _Pending] = {}  # table_id -> pending inserts
        self._deletes: dict[str, list[np.ndarray]] = {}  # collection -> pending deleted ids
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.RLock()
        self._stop = threading.Event()
        self._background: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def writes(self) -> bool:
        return self.role != "readonly"

    def start(self) -> None:
        self.meta.ensure_schema(create=self.writes)
        if self.writes:
            for row in self.meta.delete_shadow_files():
                self.store.remove_segment(row.table_id, row.segment_id)
            self.store.remove_stale_temp_dirs()
            self._background = threading.Thread(target=self._background_loop, name="flush-and-clean", daemon=True)
            self._background.start()

    def stop(self) -> None:
        self._stop.set()
        if self._background is not None:
            self._background.join(timeout=10)
        if self.writes:
            try:
                self.flush([])
            except MilvusError as exc:
                log.error("final flush failed: %s", exc.reason)

    def _background_loop(self) -> None:
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

    def _clean(self) -> None:
        """Hard-delete TO_DELETE files past their TTL, then soft-deleted table rows with no files."""
        horizon = meta.now_us() - TTL_SECONDS[self.role] * 1_000_000
        stale = self.meta.files_to_purge(horizon)
        for row in stale:
            self.store.remove_segment(row.table_id, row.segment_id)
            self.cache.discard(row.id)
        self.meta.delete_file_rows([row.id for row in stale])
        self.meta.purge_deleted_tables()

    def _require_writer(self, what: str) -> None:
        if not self.writes:
            raise UnexpectedError(f"{what} is not allowed on a read-only node (deploy_mode cluster_readonly); send writes to the writable node")

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
            table_id=name, dimension=dimension, index_file_size=index_file_size_mb * MB, metric_type=metric,
            engine_type=9 if engine.is_binary(metric) else 1, index_params="{}",
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
            for table_id in tables:
                self._buffer.pop(table_id, None)
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
                {"data_size": f.file_size, "index_name": INDEX_NAMES.get(f.engine_type, str(f.engine_type)),
                 "name": f.segment_id, "row_count": f.row_count}
                for f in files if f.table_id == table.table_id
            ]
            partitions.append({
                "row_count": sum(s["row_count"] for s in segments),
                "segments": segments,
                "tag": table.partition_tag if table.is_partition else validation.DEFAULT_PARTITION_TAG,
            })
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
            table_id=self.ids.one(), dimension=row.dimension, index_file_size=row.index_file_size,
            metric_type=row.metric_type, engine_type=row.engine_type, index_params=row.index_params,
            owner_table=name, partition_tag=tag, flag=row.flag,
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
            self._buffer.pop(partition.table_id, None)
        self.meta.soft_delete_tables([partition.table_id])

    # ------------------------------------------------------------------ writes
    def insert(self, name: str, tag: str, vectors: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        self._require_writer("Insert")
        row = self.collection(name)
        self._check_vectors(row, vectors)
        if vectors.nbytes > validation.MAX_INSERT_BYTES:
            raise IllegalRowRecord(f"The amount of data inserted each time cannot exceed {validation.MAX_INSERT_BYTES // MB} MB")
        target = self._partition(name, tag) if tag.strip() else row
        if ids is not None:
            if ids.shape[0] != vectors.shape[0]:
                raise IllegalVectorId(f"The size of vector ID array ({ids.shape[0]}) must be equal to the size of the vector array ({vectors.shape[0]})")
            if (ids < 0).any():
                raise IllegalVectorId("Vector ids must not be negative")
        self._fix_id_mode(row, user_ids=ids is not None)
        if ids is None:
            ids = self.ids.take(vectors.shape[0])
        with self._buffer_lock:
            pending = self._buffer.setdefault(target.table_id, _Pending())
            pending.ids.append(ids)
            pending.vectors.append(vectors)
        return ids

    def _fix_id_mode(self, row: TableRow, user_ids: bool) -> None:
        flag = self.meta.get_table(row.table_id).flag
        if user_ids and flag & meta.FLAG_NO_USERID:
            raise IllegalVectorId("Entities IDs are auto-generated. All vectors of this collection must use auto-generated IDs.")
        if not user_ids and flag & meta.FLAG_HAS_USERID:
            raise IllegalVectorId("Entities IDs are user-defined. Please provide IDs for all vectors of this collection.")
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
            raise IllegalDimension(f"The vector dimension must be equal to the collection dimension ({row.dimension}), got {got}")

    def delete(self, name: str, ids: np.ndarray) -> None:
        self._require_writer("DeleteByID")
        row = self.collection(name)
        if ids.size == 0:
            raise IllegalVectorId("The id array is empty")
        table_ids = {t.table_id for t in self._tables(row)}
        with self._buffer_lock:
            for table_id in table_ids & self._buffer.keys():
                pending = self._buffer[table_id]
                keep = [~np.isin(chunk, ids) for chunk in pending.ids]
                pending.ids = [c[k] for c, k in zip(pending.ids, keep)]
                pending.vectors = [v[k] for v, k in zip(pending.vectors, keep)]
            self._deletes.setdefault(name, []).append(ids)

    def flush(self, names: Sequence[str]) -> None:
        """Write buffered inserts as new segments and apply pending deletes; blocks until done."""
        self._require_writer("Flush")
        rows = [self.collection(n) for n in names]
        with self._flush_lock:
            with self._buffer_lock:
                if rows:
                    wanted = {t.table_id: r.table_id for r in rows for t in self._tables(r)}
                    buffers = {k: self._buffer.pop(k) for k in list(self._buffer) if k in wanted}
                    deletes = {r.table_id: self._deletes.pop(r.table_id) for r in rows if r.table_id in self._deletes}
                else:
                    buffers, self._buffer = self._buffer, {}
                    deletes, self._deletes = self._deletes, {}
            for collection, chunks in deletes.items():
                self._apply_deletes(collection, np.unique(np.concatenate(chunks)))
            for table_id, pending in buffers.items():
                if pending.ids and sum(c.size for c in pending.ids):
                    self._write_segment(table_id, np.concatenate(pending.ids), np.concatenate(pending.vectors))

    def _write_segment(self, table_id: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        table = self.meta.get_table(table_id)
        if table is None:  # dropped while buffered
            return
        segment_id = self.ids.one()
        size = self.store.write_segment(table_id, segment_id, segment_id, ids, vectors)
        row = self.meta.add_file(
            table_id=table_id, segment_id=segment_id, file_id=segment_id, file_type=meta.RAW,
            engine_type=table.engine_type, file_size=size, row_count=int(ids.size),
        )
        self.cache.put(row.id, SegmentData(ids, vectors, np.zeros(ids.size, dtype=bool)))

    def _apply_deletes(self, collection: str, ids: np.ndarray) -> None:
        row = self.meta.get_table(collection)
        if row is None:
            return
        for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
            segment = self._segment(file, row)
            hit = np.isin(segment.ids, ids) & ~segment.deleted
            if not hit.any():
                continue
            deleted = segment.deleted | hit
            self.store.write_deleted(file.table_id, file.segment_id, deleted)
            live = int(deleted.size - np.count_nonzero(deleted))
            self.meta.update_file_rows(file.id, live, live * segment.vectors.shape[1] * segment.vectors.itemsize)
            self.cache.set_deleted(file.id, deleted)

    def compact(self, name: str) -> None:
        """Rewrite segments that carry deletions; the old files become TO_DELETE in the same step."""
        self._require_writer("Compact")
        row = self.collection(name)
        self.flush([name])
        with self._flush_lock:
            for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
                segment = self._segment(file, row)
                if not segment.deleted.any():
                    continue
                live = ~segment.deleted
                new_row = None
                if live.any():
                    segment_id = self.ids.one()
                    size = self.store.write_segment(file.table_id, segment_id, segment_id,
                                                    segment.ids[live], segment.vectors[live])
                    new_row = self.meta.add_file(
                        table_id=file.table_id, segment_id=segment_id, file_id=segment_id,
                        file_type=meta.NEW_MERGE, engine_type=file.engine_type, file_size=size,
                        row_count=int(live.sum()),
                    )
                self.meta.replace_files([new_row.id] if new_row else [], [file.id], meta.RAW)
                self.cache.discard(file.id)

    # ------------------------------------------------------------------ index
    def create_index(self, name: str, index_type: int, params: dict) -> None:
        self._require_writer("CreateIndex")
        row = self.collection(name)
        validation.index_type(index_type)
        if engine.is_binary(row.metric_type) and index_type not in (1, 2):
            raise IllegalIndexType("Invalid index type for collection metric type")
        if index_type != 1:
            raise IllegalIndexType(
                f"Index type {validation.INDEX_TYPE_NAMES[index_type]} is not available on this node; only FLAT is served")
        self.flush([name])
        engine_type = BINARY_ENGINE[index_type] if engine.is_binary(row.metric_type) else index_type
        self.meta.set_index(name, engine_type, json.dumps(params, separators=(",", ":")))

    def describe_index(self, name: str) -> tuple[int, str]:
        row = self.collection(name)
        return CLIENT_INDEX_TYPE.get(row.engine_type, row.engine_type), row.index_params or "{}"

    def drop_index(self, name: str) -> None:
        self._require_writer("DropIndex")
        row = self.collection(name)
        self.meta.set_index(name, 9 if engine.is_binary(row.metric_type) else 1, "{}")

    # ------------------------------------------------------------------ reads
    def _segment(self, file: FileRow, table: TableRow) -> SegmentData:
        binary = engine.is_binary(table.metric_type)
        return self.cache.get(file.id, lambda: self.store.load_segment(
            file.table_id, file.segment_id, file.file_id, table.dimension, binary))

    def preload(self, name: str) -> None:
        row = self.collection(name)
        files = self.meta.files_of_tables(t.table_id for t in self._tables(row))
        width = row.dimension // 8 if engine.is_binary(row.metric_type) else row.dimension * 4
        needed = sum(f.row_count * (width + 9) for f in files)
        if needed > self.cache.capacity_bytes:
            raise CacheFailed(f"Cannot preload collection {name}: it needs {needed} bytes but the cache holds {self.cache.capacity_bytes} (cache_config.cpu_cache_capacity)")
        for file in files:
            self._segment(file, row)

    def get_vectors(self, name: str, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        """One entry per id in request order, None for ids that are not flushed or deleted."""
        row = self.collection(name)
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
            for position, row_index in zip(np.flatnonzero(hit), rows):
                found[position] = live_vectors[row_index]
        return engine.is_binary(row.metric_type), found

    def segment_ids(self, name: str, segment_name: str) -> np.ndarray:
        row = self.collection(name)
        for file in self.meta.files_of_tables(t.table_id for t in self._tables(row)):
            if file.segment_id == segment_name:
                segment = self._segment(file, row)
                return segment.ids[~segment.deleted]
        raise UnexpectedError(f"Segment {segment_name} of collection {name} does not exist")

    def search(self, family: list[TableRow], tags: Sequence[str], queries: np.ndarray, topk: int, params: dict) -> SearchResult:
        row = self._search_checks(family, queries, topk)
        partitions = [(p.table_id, p.partition_tag) for p in family[1:]]
        files = self.meta.files_of_tables(validation.select_tables(row.table_id, partitions, list(tags)))
        return self._search_files(row, files, queries, topk)

    def search_in_files(self, family: list[TableRow], file_ids: Sequence[str], queries: np.ndarray, topk: int,
                        params: dict) -> SearchResult:
        row = self._search_checks(family, queries, topk)
        numbers = []
        for raw in file_ids:
            if not raw.strip().isdigit():
                raise UnexpectedError(f"Invalid file id: {raw!r} is not a number")
            numbers.append(int(raw))
        rows = self.meta.files_by_ids(numbers)
        if not rows:
            raise UnexpectedError("Invalid file id")
        own = {t.table_id for t in family}
        usable = [f for f in rows if f.table_id in own and f.file_type in meta.SEARCHABLE_FILE_TYPES]
        if len(usable) != len(rows):
            log.warning("SearchInFiles on %s skipped files %s (not searchable or not in the collection)",
                        row.table_id, sorted({f.id for f in rows} - {f.id for f in usable}))
        return self._search_files(row, usable, queries, topk)

    def search_by_ids(self, name: str, tags: Sequence[str], ids: np.ndarray, topk: int, params: dict) -> SearchResult:
        row = self.collection(name)
        binary, vectors = self.get_vectors(name, ids)
        width = row.dimension // 8 if binary else row.dimension
        dtype = np.uint8 if binary else np.float32
        known = [i for i, v in enumerate(vectors) if v is not None]
        queries = np.stack([vectors[i] for i in known]) if known else np.zeros((0, width), dtype=dtype)
        result = self.search(self.family(name), tags, queries, topk, params) if known else None
        out_ids = np.full((ids.size, topk), -1, dtype=np.int64)
        out_dist = np.full((ids.size, topk), engine.pad_distance(row.metric_type), dtype=np.float32)
        if result is not None and result.ids.size:
            out_ids[known] = result.ids
            out_dist[known] = result.distances
        return SearchResult(out_ids, out_dist)

    def reload_segments(self, name: str, file_ids: Sequence[str]) -> None:
        """Refresh the deletion bitmaps of cached files from disk (what 0.10 read-only nodes do)."""
        self.collection(name)
        numbers = []
        for raw in file_ids:
            if not raw.strip().isdigit():
                raise IllegalArgument(f"Invalid segment id: {raw!r} is not a number")
            numbers.append(int(raw))
        for file in self.meta.files_by_ids(numbers):
            cached = self.cache.peek(file.id)
            if cached is not None:
                self.cache.set_deleted(file.id, self.store.load_deleted(file.table_id, file.segment_id, cached.ids.size))

    def _search_checks(self, family: list[TableRow], queries: np.ndarray, topk: int) -> TableRow:
        row = family[0]
        validation.topk(topk)
        self._check_vectors(row, queries)
        return row

    def _search_files(self, row: TableRow, files: Sequence[FileRow], queries: np.ndarray, topk: int) -> SearchResult:
        if not files:
            return SearchResult(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        parts = []
        for file in files:
            segment = self._segment(file, row)
            parts.append(engine.search_block(row.metric_type, queries, segment.vectors, segment.ids,
                                             segment.deleted, topk, segment.norms))
        ids, dist = engine.merge_topk(parts, queries.shape[0], topk, row.metric_type)
        return SearchResult(ids, dist.astype(np.float32))

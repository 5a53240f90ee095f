"""The segment lifecycle after a flush: index builds, merges of small files, compaction, and the
TTL cleaner that finally deletes retired files.

Milvus 0.9.1's file states (utils.milvus_schema.FileType): an index build goes TO_INDEX ->
NEW_INDEX -> INDEX with the raw file kept as BACKUP; a merge or compaction writes a NEW_MERGE
file that becomes RAW (or TO_INDEX) while the files it replaces become TO_DELETE in the same
transaction; TO_DELETE files are removed once their TTL has passed, so read-only nodes can finish
searches on them. One maintenance operation runs at a time (`maintenance_lock`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from utils import validation
from utils.errors import IllegalIndexType
from utils.milvus_schema import (
    BINARY_ENGINE,
    CLIENT_INDEX_TYPE,
    INDEX_NAMES,
    FileType,
    IndexType,
    default_engine,
    is_binary,
)

from . import crash_points, index, meta
from .cache import SegmentCache
from .catalog import Catalog, IdGenerator
from .meta import FileRow, MetaStore, TableRow
from .reads import ReadPath
from .storage import SegmentStore
from .writes import WritePath, new_file_type

log = logging.getLogger(__name__)

TTL_SECONDS = {"single": 10, "writable": 3600}
UNAVAILABLE_INDEX_TYPES = (IndexType.IVF_SQ8H,)  # GPU-only: not served by this CPU node
BUILD_INDEX_THRESHOLD = 4096  # CreateIndex queues every RAW file with at least this many rows


class SegmentLifecycle:
    """Index builds, merges, compaction and purging of a node that writes."""

    def __init__(
        self,
        catalog: Catalog,
        reads: ReadPath,
        writes: WritePath,
        meta_store: MetaStore,
        store: SegmentStore,
        cache: SegmentCache,
        ids: IdGenerator,
        merge_after_s: float,
    ) -> None:
        self.catalog = catalog
        self.reads = reads
        self.writes = writes
        self.meta = meta_store
        self.store = store
        self.cache = cache
        self.ids = ids
        self.merge_after_s = merge_after_s  # RAW files unchanged this long are merge candidates; < 0: never
        self.maintenance_lock = threading.RLock()  # index builds, merges and compactions, one at a time

    def run_pending(self) -> None:
        """One beat of Milvus' index thread: build queued indexes, then merge small files."""
        self.build_pending_indexes(None)
        self.merge_small_files()

    # ------------------------------------------------------------------ start-up and the TTL cleaner
    def remove_leftovers(self) -> None:
        """At a writer's start: drop what a crash left half-written (shadow rows, temp and orphan dirs)."""
        for row in self.meta.delete_shadow_files():
            self._remove_file_artifacts(row, whole_segment=row.file_id == row.segment_id)
        self.store.remove_stale_temp_dirs()
        for orphan in self.store.remove_orphan_segments(self.meta.segment_keys()):
            log.warning("removed segment dir %s: no meta row refers to it (crash before its flush committed)", orphan)

    def clean(self) -> None:
        """Hard-delete TO_DELETE files past their TTL, then soft-deleted table rows with no files."""
        horizon = meta.now_us() - TTL_SECONDS[self.catalog.role] * 1_000_000
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

    def _discard(self, file_ids: Sequence[int]) -> None:
        for file_id in file_ids:
            self.cache.discard(file_id)

    # ------------------------------------------------------------------ compaction and merges
    def compact(self, name: str) -> None:
        """Rewrite segments that carry deletions (NEW_MERGE -> RAW/TO_INDEX); the old segment's files
        (raw, index, backup) become TO_DELETE in the same transaction."""
        self.catalog.require_writer("Compact")
        row = self.catalog.collection(name)
        self.writes.flush([name])
        tables = {t.table_id: t for t in self.catalog.tables(row)}
        with self.maintenance_lock, self.writes.flush_lock:
            for file in self.meta.files_of_tables(tables):
                segment = self.reads.segment(file, row)
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
        new_ids, new_type = [], FileType.RAW
        if ids.size:
            segment_id = self.ids.one()
            size = self.store.write_segment(table.table_id, segment_id, segment_id, ids, vectors)
            new_row = self.meta.add_file(
                table_id=table.table_id,
                segment_id=segment_id,
                file_id=segment_id,
                file_type=FileType.NEW_MERGE,
                engine_type=table.engine_type,
                file_size=size,
                row_count=int(ids.size),
                flush_lsn=lsn,
            )
            crash_points.reached(point)
            new_ids, new_type = [new_row.id], new_file_type(table, size)
        self.meta.replace_files(new_ids, retired, new_type)
        self._discard(retired)

    def merge_small_files(self) -> None:
        """Combine RAW files below index_file_size, unchanged for `merge_after_s`, up to that size."""
        if self.merge_after_s < 0:
            return
        horizon = meta.now_us() - int(self.merge_after_s * 1_000_000)
        by_table: dict[str, list[FileRow]] = {}
        for file in self.meta.files_of_types([FileType.RAW]):
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
        with self.maintenance_lock, self.writes.flush_lock:
            current = {f.id for f in self.meta.files_by_ids([f.id for f in files]) if f.file_type == FileType.RAW}
            files = [f for f in files if f.id in current]  # a compaction or drop may have won the race
            if len(files) < 2:
                return
            segments = [self.reads.segment(f, table) for f in files]
            ids = np.concatenate([s.ids[~s.deleted] for s in segments])
            vectors = np.concatenate([s.vectors[~s.deleted] for s in segments])
            self._rewrite(
                table, ids, vectors, max(f.flush_lsn for f in files), [f.id for f in files], "merge.new_file_written"
            )
        log.info("merged %d files of %s into one of %d rows", len(files), table.table_id, ids.size)

    # ------------------------------------------------------------------ indexes
    def create_index(self, name: str, index_type: int, params: dict) -> None:
        """Validate, flush, record the index, build every RAW file of at least BUILD_INDEX_THRESHOLD rows
        (whatever its size: 0.9.1's rule; smaller files stay RAW and are searched raw), then return."""
        self.catalog.require_writer("CreateIndex")
        row = self.catalog.collection(name)
        validation.index_type(index_type)
        binary = is_binary(row.metric_type)
        if binary and index_type not in BINARY_ENGINE:
            raise IllegalIndexType("Invalid index type for collection metric type")
        if index_type in UNAVAILABLE_INDEX_TYPES:
            raise IllegalIndexType(f"Unsupported index type: {index_type}")
        engine_type = BINARY_ENGINE[index_type] if binary else index_type
        index.check_index_params(engine_type, row.dimension, params)
        self.writes.flush([name])
        params_json = json.dumps(params, separators=(",", ":"))
        tables = [t.table_id for t in self.catalog.tables(row)]
        with self.maintenance_lock:
            if (row.engine_type, row.index_params) != (engine_type, params_json):
                self._discard(self.meta.drop_index_files(tables, engine_type))
                self.meta.set_index(name, engine_type, params_json)
            if engine_type not in index.EXACT_TYPES:
                self.meta.mark_to_index(tables, BUILD_INDEX_THRESHOLD)
                self.build_pending_indexes(tables)

    def describe_index(self, name: str) -> tuple[int, str]:
        row = self.catalog.collection(name)
        return CLIENT_INDEX_TYPE.get(row.engine_type, row.engine_type), row.index_params or "{}"

    def drop_index(self, name: str) -> None:
        """Back to FLAT: index files retire, their raw backups become RAW (searchable) again."""
        self.catalog.require_writer("DropIndex")
        row = self.catalog.collection(name)
        flat = default_engine(row.metric_type)
        with self.maintenance_lock:
            self._discard(self.meta.drop_index_files([t.table_id for t in self.catalog.tables(row)], flat))
            self.meta.set_index(name, flat, "{}")

    def build_pending_indexes(self, table_ids: Sequence[str] | None) -> None:
        """Build every TO_INDEX file (of `table_ids`, or of all tables): Milvus' index thread."""
        with self.maintenance_lock:
            for file in self.meta.files_of_types([FileType.TO_INDEX], table_ids):
                self._build_index(file)

    def _build_index(self, source: FileRow) -> None:
        """TO_INDEX -> (NEW_INDEX while building) -> INDEX, with the raw file kept as BACKUP."""
        table = self.meta.get_table(source.table_id)
        if table is None:
            return
        if table.engine_type in index.EXACT_TYPES:
            self.meta.set_file_type([source.id], FileType.RAW)
            return
        segment = self.reads.segment(source, table)
        new_row = self.meta.add_file(
            table_id=source.table_id,
            segment_id=source.segment_id,
            file_id=self.ids.one(),
            file_type=FileType.NEW_INDEX,
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
            self.meta.set_file_type([source.id], FileType.RAW)
            return
        crash_points.reached("index.file_written")
        if self.meta.publish_index(new_row.id, source.id, size):
            self.cache.discard(source.id)
            log.info(
                "built %s index of file %d (%d rows) in %.2f s",
                INDEX_NAMES.get(table.engine_type),
                source.id,
                segment.ids.size,
                time.monotonic() - started,
            )

"""The read path: segments loaded through the LRU cache, searches, vectors by id, preloading.

Searches read only flushed, searchable files; a read-only node refreshes the deletions of the
segments it caches on `ReloadSegments`. Milvus' reply width rules are applied here (see
`_search_files`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from utils import validation
from utils.errors import CacheFailed, IllegalArgument, IllegalVectorId, UnexpectedError
from utils.milvus_schema import IN_PROGRESS_FILE_TYPES, FileType, is_binary, is_match_filter

from . import engine, index
from .cache import SegmentCache
from .catalog import Catalog, check_vectors
from .meta import FileRow, MetaStore, TableRow
from .storage import SegmentData, SegmentStore

log = logging.getLogger(__name__)

MAX_GET_IDS = 1000  # GetVectorsByID's id array cap


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # int64 (nq, k), -1 padded; (0, 0) when nothing was searchable
    distances: np.ndarray  # float32, same shape


def _empty_result() -> SearchResult:
    return SearchResult(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))


class ReadPath:
    """Everything that reads flushed segments; shared by the write path and the segment lifecycle
    for `segment`, so every part sees the same cached copy."""

    def __init__(self, catalog: Catalog, meta_store: MetaStore, store: SegmentStore, cache: SegmentCache) -> None:
        self.catalog = catalog
        self.meta = meta_store
        self.store = store
        self.cache = cache

    def segment(self, file: FileRow, table: TableRow) -> SegmentData:
        """A file's rows from its segment's raw file (file_id = segment_id), plus its index if it is one."""

        def load() -> SegmentData:
            data = self.store.load_segment(
                file.table_id, file.segment_id, file.segment_id, table.dimension, is_binary(table.metric_type)
            )
            if file.file_type == FileType.INDEX and file.engine_type not in index.EXACT_TYPES:
                data.index = index.load(
                    file.engine_type,
                    self.store.index_path(file.table_id, file.segment_id, file.file_id),
                    table.dimension,
                    table.metric_type,
                )
            return data

        return self.cache.get(file.id, load)

    def preload(self, name: str) -> None:
        row = self.catalog.collection(name)
        files = self.meta.files_of_tables(t.table_id for t in self.catalog.tables(row))
        width = row.dimension // 8 if is_binary(row.metric_type) else row.dimension * 4
        needed = sum(f.row_count * (width + 9) for f in files)
        if needed > self.cache.capacity_bytes:
            raise CacheFailed(
                f"Cannot preload collection {name}: it needs {needed} bytes but the cache holds "
                f"{self.cache.capacity_bytes} (cache_config.cpu_cache_capacity)"
            )
        for file in files:
            self.segment(file, row)

    def reload_segments(self, name: str, file_ids: Sequence[str]) -> None:
        """Refresh the deletion bitmaps of cached files from disk (what 0.10 read-only nodes do)."""
        self.catalog.collection(name)
        for file in self.meta.files_by_ids(validation.file_ids(list(file_ids), "segment id", IllegalArgument)):
            cached = self.cache.peek(file.id)
            if cached is not None:
                self.cache.set_deleted(
                    file.id, self.store.load_deleted(file.table_id, file.segment_id, cached.ids.size)
                )

    # ------------------------------------------------------------------ by id
    def get_vectors(self, name: str, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        """GetVectorsByID: one entry per id in request order, None for ids that are not flushed or
        deleted; at most MAX_GET_IDS ids per request, as 0.9.1 allows."""
        row = self.catalog.collection(name)
        if ids.size > MAX_GET_IDS:
            raise IllegalArgument(f"Input id array size cannot exceed: {MAX_GET_IDS}")
        return self._vectors_by_id(row, ids)

    def _vectors_by_id(self, row: TableRow, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        if ids.size == 0:
            raise IllegalVectorId("The id array is empty")
        found: list[np.ndarray | None] = [None] * ids.size
        for file in self.meta.files_of_tables(t.table_id for t in self.catalog.tables(row)):
            segment = self.segment(file, row)
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
        return is_binary(row.metric_type), found

    def segment_ids(self, name: str, segment_name: str) -> np.ndarray:
        row = self.catalog.collection(name)
        for file in self.meta.files_of_tables(t.table_id for t in self.catalog.tables(row)):
            if file.segment_id == segment_name:
                segment = self.segment(file, row)
                return segment.ids[~segment.deleted]
        raise UnexpectedError(f"Segment {segment_name} of collection {name} does not exist")

    # ------------------------------------------------------------------ search
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
        usable = [f for f in rows if f.table_id in own and f.file_type not in IN_PROGRESS_FILE_TYPES]
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
        family = self.catalog.family(name)
        row = family[0]
        validation.topk(topk)
        index.check_search_params(row.engine_type, topk, params)  # also when no id is found
        _, vectors = self._vectors_by_id(row, ids)
        known = [i for i, v in enumerate(vectors) if v is not None]
        if not known:
            return _empty_result()
        result = self.search(family, tags, np.stack([vectors[i] for i in known]), topk, params)
        width = result.ids.shape[1]
        if width == 0:
            return result
        out_ids = np.full((ids.size, width), -1, dtype=np.int64)
        out_dist = np.full((ids.size, width), engine.pad_distance(row.metric_type), dtype=np.float32)
        out_ids[known] = result.ids
        out_dist[known] = result.distances
        return SearchResult(out_ids, out_dist)

    def _search_checks(self, family: list[TableRow], queries: np.ndarray, topk: int, params: dict) -> TableRow:
        """topk, then the search parameters against the collection's CURRENT index type, then vectors."""
        row = family[0]
        validation.topk(topk)
        index.check_search_params(row.engine_type, topk, params)
        check_vectors(row, queries)
        return row

    def _search_files(
        self, row: TableRow, files: Sequence[FileRow], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        """Milvus' reply width: each file gives min(its live rows, topk) columns and the files merge to
        min(topk, their sum), so a reply is min(topk, live rows searched) wide, (0, 0) with none."""
        match_filter = is_match_filter(row.metric_type)
        parts, candidate_ids, candidate_dist = [], [], []
        live_rows = 0
        for file in files:  # in file order: a match filter keeps its first matches in storage order
            segment = self.segment(file, row)
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
            return _empty_result()
        if candidate_ids:  # one ranking over every indexed segment's candidates
            parts.append(engine.select_topk(np.hstack(candidate_dist), np.hstack(candidate_ids), topk, row.metric_type))
        ids, dist = engine.merge_topk(parts, queries.shape[0], topk, row.metric_type)
        return SearchResult(np.ascontiguousarray(ids[:, :width]), dist[:, :width].astype(np.float32))

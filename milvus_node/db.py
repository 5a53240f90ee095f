"""The node's database, as the gRPC servicer sees it: one object whose methods are the Milvus calls.

The work is done by four parts, each one responsibility (and one file):

* `catalog.Catalog`: collections and partitions (lookups, create, list, stats);
* `writes.WritePath`: the WAL, the insert buffer, deletes, drops and flush;
* `segments.SegmentLifecycle`: index builds, merges, compaction, the TTL cleaner;
* `reads.ReadPath`: segments through the LRU cache, searches, vectors by id.

`NodeDB` builds them, runs the two background threads a writer needs (auto flush + cleaner,
index builds + merges) and hands each call to its part. The role decides what this node may do:
`readonly` never writes meta or files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from utils.errors import MilvusError

from .cache import SegmentCache
from .catalog import Catalog, IdGenerator
from .config import RuntimeConfig
from .meta import MetaStore, TableRow
from .reads import ReadPath, SearchResult
from .segments import SegmentLifecycle
from .storage import SegmentStore
from .writes import WritePath

log = logging.getLogger(__name__)

GB = 1 << 30
MAINTENANCE_PERIOD_S = 1.0  # Milvus' index thread cadence; merges run on the same beat
CLEAN_PERIOD_S = 1.0


class NodeDB:
    def __init__(
        self, meta_store: MetaStore, store: SegmentStore, role: str, config: RuntimeConfig, merge_after_s: float = 10.0
    ) -> None:
        self.meta = meta_store
        self.store = store
        self.role = role
        self.config = config
        self.cache = SegmentCache(config.get_int("cache_config.cpu_cache_capacity") * GB)
        config.on_change("cache_config.cpu_cache_capacity", lambda v: self.cache.resize(int(v) * GB))
        ids = IdGenerator()
        self.catalog = Catalog(meta_store, role, ids)
        self.reads = ReadPath(self.catalog, meta_store, store, self.cache)
        self.writes = WritePath(
            self.catalog, self.reads, meta_store, store, self.cache, ids, config.get("wal_config.wal_path")
        )
        self.segments = SegmentLifecycle(
            self.catalog, self.reads, self.writes, meta_store, store, self.cache, ids, merge_after_s
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.meta.ensure_schema(create=self.catalog.writes)
        if self.catalog.writes:
            self.segments.remove_leftovers()
            self.writes.recover()
            for target, name in ((self._flush_loop, "flush-and-clean"), (self._maintenance_loop, "index-and-merge")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.catalog.writes:
            try:
                self.writes.flush([])
            except MilvusError as exc:
                log.error("final flush failed: %s", exc.reason)
            self.writes.close()

    def _flush_loop(self) -> None:
        last_flush = last_clean = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            interval = self.config.get_int("db_config.auto_flush_interval")
            try:
                if interval > 0 and now - last_flush >= interval:
                    last_flush = now
                    self.writes.flush([])
                if now - last_clean >= CLEAN_PERIOD_S:
                    last_clean = now
                    self.segments.clean()
            except Exception:  # the loop must survive a meta DB hiccup
                log.exception("background flush/clean failed")

    def _maintenance_loop(self) -> None:
        while not self._stop.wait(MAINTENANCE_PERIOD_S):
            try:
                self.segments.run_pending()
            except Exception:  # the loop must survive a meta DB hiccup
                log.exception("background index build/merge failed")

    # ------------------------------------------------------------------ collections and partitions
    def collection(self, name: str) -> TableRow:
        return self.catalog.collection(name)

    def family(self, name: str) -> list[TableRow]:
        return self.catalog.family(name)

    def create_collection(self, name: str, dimension: int, index_file_size_mb: int, metric: int) -> None:
        self.catalog.create_collection(name, dimension, index_file_size_mb, metric)

    def has_collection(self, name: str) -> bool:
        return self.catalog.has_collection(name)

    def list_collections(self) -> list[str]:
        return self.catalog.list_collections()

    def count(self, name: str) -> int:
        return self.catalog.count(name)

    def stats(self, name: str) -> dict:
        return self.catalog.stats(name)

    def drop_collection(self, name: str) -> None:
        self.writes.drop_collection(name)

    def create_partition(self, name: str, tag: str) -> None:
        self.catalog.create_partition(name, tag)

    def has_partition(self, name: str, tag: str) -> bool:
        return self.catalog.has_partition(name, tag)

    def list_partitions(self, name: str) -> list[str]:
        return self.catalog.list_partitions(name)

    def drop_partition(self, name: str, tag: str) -> None:
        self.writes.drop_partition(name, tag)

    # ------------------------------------------------------------------ writes
    def insert(self, name: str, tag: str, vectors: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        return self.writes.insert(name, tag, vectors, ids)

    def delete(self, name: str, ids: np.ndarray) -> None:
        self.writes.delete(name, ids)

    def flush(self, names: Sequence[str]) -> None:
        self.writes.flush(names)

    def compact(self, name: str) -> None:
        self.segments.compact(name)

    # ------------------------------------------------------------------ indexes
    def create_index(self, name: str, index_type: int, params: dict) -> None:
        self.segments.create_index(name, index_type, params)

    def describe_index(self, name: str) -> tuple[int, str]:
        return self.segments.describe_index(name)

    def drop_index(self, name: str) -> None:
        self.segments.drop_index(name)

    # ------------------------------------------------------------------ reads
    def preload(self, name: str) -> None:
        self.reads.preload(name)

    def reload_segments(self, name: str, file_ids: Sequence[str]) -> None:
        self.reads.reload_segments(name, file_ids)

    def get_vectors(self, name: str, ids: np.ndarray) -> tuple[bool, list[np.ndarray | None]]:
        return self.reads.get_vectors(name, ids)

    def segment_ids(self, name: str, segment_name: str) -> np.ndarray:
        return self.reads.segment_ids(name, segment_name)

    def search(
        self, family: list[TableRow], tags: Sequence[str], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        return self.reads.search(family, tags, queries, topk, params)

    def search_in_files(
        self, family: list[TableRow], file_ids: Sequence[str], queries: np.ndarray, topk: int, params: dict
    ) -> SearchResult:
        return self.reads.search_in_files(family, file_ids, queries, topk, params)

    def search_by_ids(self, name: str, tags: Sequence[str], ids: np.ndarray, topk: int, params: dict) -> SearchResult:
        return self.reads.search_by_ids(name, tags, ids, topk, params)

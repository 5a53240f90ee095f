"""Loaded segments held in memory, least-recently-used first out, bounded in bytes.

A read-only node answers from this cache: deletions the writable node applies later stay
invisible until `ReloadSegments` refreshes a file's deletion bitmap, as in Milvus.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from .storage import SegmentData


class SegmentCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, SegmentData] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def get(self, file_id: int, load: Callable[[], SegmentData]) -> SegmentData:
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                self._entries.move_to_end(file_id)
                return entry
        segment = load()  # outside the lock: loading is disk I/O
        self.put(file_id, segment)
        return segment

    def peek(self, file_id: int) -> SegmentData | None:
        with self._lock:
            return self._entries.get(file_id)

    def put(self, file_id: int, segment: SegmentData) -> None:
        with self._lock:
            old = self._entries.pop(file_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[file_id] = segment
            self._bytes += segment.nbytes
            self._evict()

    def resize(self, capacity_bytes: int) -> None:
        """A new bound (set_config cache_config.cpu_cache_capacity), enforced at once."""
        with self._lock:
            self.capacity_bytes = capacity_bytes
            self._evict()

    def _evict(self) -> None:
        """Drop least-recently-used entries until within capacity; the newest entry always stays."""
        while self._bytes > self.capacity_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes

    def set_deleted(self, file_id: int, deleted: np.ndarray) -> None:
        """Replace the deletion bitmap of a cached segment (no-op when it is not cached)."""
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                self._entries[file_id] = SegmentData(entry.ids, entry.vectors, deleted, entry.norms, entry.index)

    def discard(self, file_id: int) -> None:
        with self._lock:
            old = self._entries.pop(file_id, None)
            if old is not None:
                self._bytes -= old.nbytes

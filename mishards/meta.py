"""Read-only access to the shared Milvus meta DB: which tables a collection has, which files to search.

Each call takes a pooled connection for one short statement, so on MySQL's REPEATABLE READ no
request reads through an old snapshot. The proxy never writes here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.errors import MetaFailed

SEARCHABLE_FILE_TYPES = (1, 2, 3)  # RAW, TO_INDEX, INDEX
IN_PROGRESS_FILE_TYPES = (0, 5, 6)  # NEW, NEW_MERGE, NEW_INDEX: still being written
STATE_TO_DELETE = 1

# Plain SQL on a raw DB-API cursor: the search path runs one of these per request, and going
# through SQLAlchemy's statement compilation costs ~10x the SQLite query itself.
_COLLECTION_SQL = (
    "SELECT table_id, owner_table, partition_tag, metric_type, dimension FROM Tables "
    f"WHERE (table_id = {{p}} OR owner_table = {{p}}) AND state <> {STATE_TO_DELETE} ORDER BY id"
)
_FILES_SQL = (
    f"SELECT id, updated_time FROM TableFiles WHERE file_type IN {SEARCHABLE_FILE_TYPES} "
    "AND table_id IN ({ps}) ORDER BY id"
)
_FILES_BY_ID_SQL = "SELECT id, table_id, file_type, updated_time FROM TableFiles WHERE id IN ({ps})"


@dataclass(frozen=True)
class CollectionTables:
    """A collection's own row and its partitions, what search routing needs to know of it."""

    name: str
    metric_type: int
    dimension: int
    partitions: tuple[tuple[str, str], ...]  # (table_id, tag)

    def table_ids(self) -> list[str]:
        return [self.name] + [table_id for table_id, _ in self.partitions]


@dataclass(frozen=True)
class FileSet:
    """Searchable files: decimal ids as sent in SearchInFiles, and their `updated_time`."""

    ids: list[str]
    updated: np.ndarray  # int64, aligned with ids

    def __len__(self) -> int:
        return len(self.ids)


def create_engine(
    uri: str,
    *,
    echo: bool,
    pool_size: int,
    pool_recycle: int,
    pool_timeout: int,
    pool_pre_ping: bool,
    max_overflow: int,
) -> Engine:
    if uri.startswith("sqlite"):
        return sa.create_engine(uri, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})
    return sa.create_engine(
        uri,
        echo=echo,
        pool_size=max(pool_size, 1),
        pool_recycle=pool_recycle,
        pool_timeout=pool_timeout,
        pool_pre_ping=pool_pre_ping,
        max_overflow=max_overflow,
    )


class MetaReader:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._placeholder = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        # SQLite is read inline on the event loop: that thread keeps one connection (a pool
        # checkout and reset per query cost as much as the query). Python's sqlite3 opens no
        # transaction for a SELECT, so each statement still sees the latest commit.
        self._held = threading.local() if engine.dialect.name == "sqlite" else None

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        """One statement; on servers on a pooled connection, rolled back on return, so no snapshot
        outlives it."""
        held = self._held
        try:
            if held is not None:
                connection = getattr(held, "connection", None)
                if connection is None:
                    connection = held.connection = self.engine.raw_connection()
                try:
                    return self._execute(connection, sql, params)
                except Exception:
                    held.connection = None
                    connection.invalidate()
                    raise
            connection = self.engine.raw_connection()
            try:
                return self._execute(connection, sql, params)
            finally:
                connection.close()
        except Exception as exc:  # DB-API errors differ per driver
            raise MetaFailed(f"meta DB query failed: {exc.__class__.__name__}: {exc}") from None

    @staticmethod
    def _execute(connection, sql: str, params: Sequence) -> list[tuple]:
        cursor = connection.cursor()
        try:
            cursor.execute(sql, tuple(params))
            return cursor.fetchall()
        finally:
            cursor.close()

    def _in(self, count: int) -> str:
        return ", ".join([self._placeholder] * count)

    def collection(self, name: str) -> CollectionTables | None:
        own = None
        partitions = []
        sql = _COLLECTION_SQL.format(p=self._placeholder)
        for table_id, owner_table, partition_tag, metric_type, dimension in self._rows(sql, (name, name)):
            if table_id == name and not owner_table:
                own = (metric_type, dimension)
            elif owner_table == name:
                partitions.append((table_id, partition_tag))
        if own is None:
            return None
        return CollectionTables(name, own[0], own[1], tuple(partitions))

    def searchable_files(self, table_ids: Sequence[str]) -> FileSet:
        if not table_ids:
            return FileSet([], np.zeros(0, np.int64))
        rows = self._rows(_FILES_SQL.format(ps=self._in(len(table_ids))), table_ids)
        return FileSet([str(r[0]) for r in rows], np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)))

    def files_by_ids(self, ids: Sequence[int]) -> list[tuple]:
        """(id, table_id, file_type, updated_time) of the given file ids that exist."""
        return self._rows(_FILES_BY_ID_SQL.format(ps=self._in(len(ids))), ids) if ids else []


class SchemaCache:
    """Collection rows for routing, kept `ttl` seconds and dropped at once on changes made through the proxy."""

    def __init__(self, reader: MetaReader, ttl: float) -> None:
        self.reader = reader
        self.ttl = ttl
        self._entries: dict[str, tuple[float, CollectionTables | None]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> CollectionTables | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        value = self.reader.collection(name)
        with self._lock:
            self._entries[name] = (now, value)
            if len(self._entries) > 10_000:  # bounded: forget the oldest half
                for key, _ in sorted(self._entries.items(), key=lambda kv: kv[1][0])[:5_000]:
                    del self._entries[key]
        return value

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._entries.clear()
            else:
                self._entries.pop(name, None)

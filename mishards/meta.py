"""Read-only access to the shared Milvus meta DB: which tables a collection has, which files to search.

Each call takes a pooled connection for one short statement, so on MySQL's REPEATABLE READ no
request reads through an old snapshot. The proxy never writes here.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.errors import MetaFailed

SEARCHABLE_FILE_TYPES = (1, 2, 3)  # RAW, TO_INDEX, INDEX
STATE_TO_DELETE = 1

_meta = sa.MetaData()
_tables = sa.Table(
    "Tables", _meta,
    sa.Column("id", sa.BigInteger), sa.Column("table_id", sa.String(255)), sa.Column("state", sa.Integer),
    sa.Column("dimension", sa.Integer), sa.Column("metric_type", sa.Integer),
    sa.Column("owner_table", sa.String(255)), sa.Column("partition_tag", sa.String(255)),
)
_files = sa.Table(
    "TableFiles", _meta,
    sa.Column("id", sa.BigInteger), sa.Column("table_id", sa.String(255)), sa.Column("file_type", sa.Integer),
    sa.Column("updated_time", sa.BigInteger), sa.Column("row_count", sa.BigInteger),
)

_COLLECTION_QUERY = (
    sa.select(_tables.c.table_id, _tables.c.owner_table, _tables.c.partition_tag, _tables.c.metric_type,
              _tables.c.dimension)
    .where(sa.or_(_tables.c.table_id == sa.bindparam("name"), _tables.c.owner_table == sa.bindparam("name")),
           _tables.c.state != STATE_TO_DELETE)
    .order_by(_tables.c.id)
)
_FILES_QUERY = (
    sa.select(_files.c.id, _files.c.table_id, _files.c.updated_time)
    .where(_files.c.table_id.in_(sa.bindparam("tables", expanding=True)),
           _files.c.file_type.in_(SEARCHABLE_FILE_TYPES))
    .order_by(_files.c.id)
)
_FILES_BY_ID_QUERY = (
    sa.select(_files.c.id, _files.c.table_id, _files.c.file_type, _files.c.updated_time)
    .where(_files.c.id.in_(sa.bindparam("ids", expanding=True)))
)


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


def create_engine(uri: str, *, echo: bool, pool_size: int, pool_recycle: int, pool_timeout: int,
                  pool_pre_ping: bool, max_overflow: int) -> Engine:
    if uri.startswith("sqlite"):
        return sa.create_engine(uri, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})
    return sa.create_engine(uri, echo=echo, pool_size=max(pool_size, 1), pool_recycle=pool_recycle,
                            pool_timeout=pool_timeout, pool_pre_ping=pool_pre_ping, max_overflow=max_overflow)


class MetaReader:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _rows(self, query: sa.Select, **params) -> list[sa.Row]:
        try:
            with self.engine.connect() as conn:
                return conn.execute(query, params).all()
        except sa.exc.SQLAlchemyError as exc:
            raise MetaFailed(f"meta DB query failed: {exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}") from None

    def collection(self, name: str) -> CollectionTables | None:
        own = None
        partitions = []
        for row in self._rows(_COLLECTION_QUERY, name=name):
            if row.table_id == name and not row.owner_table:
                own = row
            elif row.owner_table == name:
                partitions.append((row.table_id, row.partition_tag))
        if own is None:
            return None
        return CollectionTables(name, own.metric_type, own.dimension, tuple(partitions))

    def searchable_files(self, table_ids: Sequence[str]) -> FileSet:
        rows = self._rows(_FILES_QUERY, tables=list(table_ids))
        return FileSet([str(r[0]) for r in rows], np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows)))

    def files_by_ids(self, ids: Sequence[int]) -> list[sa.Row]:
        return self._rows(_FILES_BY_ID_QUERY, ids=list(ids)) if ids else []


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

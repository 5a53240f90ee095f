"""Read-only access to the shared Milvus meta DB: which tables a collection has, which files to search.

Every read is one statement that sees the latest commit (autocommit, or SQLite's statement-level
reads), so a search after a flush finds the flushed files; the file list is never cached. The
proxy never writes here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.errors import MetaFailed
from utils.milvus_schema import SEARCHABLE_FILE_TYPES, TableState, sql_list

from .mysql_wire import ConnectionLost, MysqlChannel, ServerError, Unsupported, open_session

log = logging.getLogger(__name__)

# A meta read waits at least this long, even for a request with less time left: a DB that is merely
# slower than one caller's deadline is not dropped and reconnected for it.
MIN_QUERY_TIMEOUT_S = 1.0

# Plain SQL on a raw DB-API cursor: the search path runs one of these per request, and going
# through SQLAlchemy's statement compilation costs ~10x the SQLite query itself.
_COLLECTION_SQL = (
    "SELECT table_id, owner_table, partition_tag, metric_type, dimension FROM Tables "
    f"WHERE (table_id = {{p}} OR owner_table = {{p}}) AND state <> {TableState.TO_DELETE} ORDER BY id"
)
_FILES_SQL = (
    f"SELECT id, updated_time FROM TableFiles WHERE file_type IN {sql_list(SEARCHABLE_FILE_TYPES)} "
    "AND table_id IN ({ps}) ORDER BY id"
)
_FILES_BY_ID_SQL = "SELECT id, table_id, file_type, updated_time FROM TableFiles WHERE id IN ({ps})"
_SPREAD_SQL = (
    "SELECT CASE WHEN t.owner_table = '' OR t.owner_table IS NULL THEN t.table_id ELSE t.owner_table END, "
    "f.id, f.row_count, f.file_size FROM TableFiles f JOIN Tables t ON t.table_id = f.table_id "
    f"WHERE f.file_type IN {sql_list(SEARCHABLE_FILE_TYPES)} AND t.state <> {TableState.TO_DELETE} ORDER BY f.id"
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
    """The proxy's reads of the meta DB, each one statement that sees the latest commit.

    SQLite is read inline on the event loop through one held connection per thread (Python's
    sqlite3 opens no transaction for a SELECT). MySQL/MariaDB through PyMySQL is read on the loop
    too, over one held autocommit session (`mysql_wire`), without a worker thread. Anything else
    (TLS, another driver) takes a pooled connection on a worker thread per statement.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._placeholder = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._held = threading.local() if engine.dialect.name == "sqlite" else None
        self._session: _HeldSession | None = None
        if engine.dialect.name == "mysql" and engine.dialect.driver == "pymysql":
            args, params = engine.dialect.create_connect_args(engine.url)
            if not any(key.startswith("ssl") for key in params):
                self._session = _HeldSession(engine.dialect.loaded_dbapi.connect, tuple(args), dict(params))

    async def _rows(self, sql: str, params: Sequence, timeout: float) -> list[tuple]:
        """One statement's rows; MetaFailed (with the reason) when the DB cannot answer in `timeout` s."""
        session = self._session
        if session is not None and session.usable:
            try:
                return await session.rows(sql, params, max(timeout, MIN_QUERY_TIMEOUT_S))
            except Unsupported as exc:
                log.warning("meta DB reads fall back to pooled connections on worker threads: %s", exc)
        if self._held is not None:
            return self._inline_rows(sql, params)
        try:
            async with asyncio.timeout(max(timeout, MIN_QUERY_TIMEOUT_S)):
                return await asyncio.to_thread(self._pooled_rows, sql, params)
        except TimeoutError as exc:
            raise MetaFailed(f"meta DB query failed: no answer in {max(timeout, MIN_QUERY_TIMEOUT_S):.1f} s") from exc

    def _inline_rows(self, sql: str, params: Sequence) -> list[tuple]:
        held = self._held
        assert held is not None  # SQLite's per-thread connection
        try:
            connection = getattr(held, "connection", None)
            if connection is None:
                connection = held.connection = self.engine.raw_connection()
            try:
                return self._execute(connection, sql, params)
            except Exception:
                held.connection = None
                connection.invalidate()
                raise
        except Exception as exc:  # DB-API errors differ per driver
            raise MetaFailed(f"meta DB query failed: {exc.__class__.__name__}: {exc}") from exc

    def _pooled_rows(self, sql: str, params: Sequence) -> list[tuple]:
        """On a pooled connection, rolled back on return, so no snapshot outlives the statement."""
        try:
            connection = self.engine.raw_connection()
            try:
                return self._execute(connection, sql, params)
            finally:
                connection.close()
        except Exception as exc:  # DB-API errors differ per driver
            raise MetaFailed(f"meta DB query failed: {exc.__class__.__name__}: {exc}") from exc

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

    async def collection(self, name: str, timeout: float) -> CollectionTables | None:
        own = None
        partitions = []
        sql = _COLLECTION_SQL.format(p=self._placeholder)
        for table_id, owner_table, partition_tag, metric_type, dimension in await self._rows(
            sql, (name, name), timeout
        ):
            if table_id == name and not owner_table:
                own = (metric_type, dimension)
            elif owner_table == name:
                partitions.append((table_id, partition_tag))
        if own is None:
            return None
        return CollectionTables(name, own[0], own[1], tuple(partitions))

    async def searchable_files(self, table_ids: Sequence[str], timeout: float) -> FileSet:
        if not table_ids:
            return FileSet([], np.zeros(0, np.int64))
        rows = await self._rows(_FILES_SQL.format(ps=self._in(len(table_ids))), table_ids, timeout)
        return FileSet([str(r[0]) for r in rows], np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)))

    async def files_by_ids(self, ids: Sequence[int], timeout: float) -> list[tuple]:
        """(id, table_id, file_type, updated_time) of the given file ids that exist."""
        return await self._rows(_FILES_BY_ID_SQL.format(ps=self._in(len(ids))), ids, timeout) if ids else []

    def searchable_files_by_collection(self) -> dict[str, list[tuple[str, int, int]]]:
        """Every collection's searchable files as (id, row_count, file_size), partitions included.
        Blocking, on a pooled connection: for the status page's worker thread, never the search path."""
        files: dict[str, list[tuple[str, int, int]]] = {}
        for collection, file_id, row_count, file_size in self._pooled_rows(_SPREAD_SQL, ()):
            files.setdefault(collection, []).append((str(file_id), int(row_count or 0), int(file_size or 0)))
        return files

    async def close(self) -> None:
        """Close the held MySQL session (SQLite and pooled connections belong to the engine)."""
        if self._session is not None:
            self._session.close()


class _HeldSession:
    """One autocommit MySQL session on the event loop, opened on first use and again after it is lost.

    Concurrent statements share it (pipelined) and share one connect attempt. A statement whose
    connection is lost before its answer is sent once more on a new connection (a SELECT is
    idempotent); one that gets no answer in time fails, and the connection is dropped so the next
    statement starts on a fresh one instead of queueing behind a dead peer.
    """

    def __init__(self, connect, args: tuple, params: dict[str, Any]) -> None:
        self._connect = connect
        self._args = args
        self._params = params
        self.usable = True  # False once the server's session turned out not to be one we can read
        self._channel: MysqlChannel | None = None
        self._escape: Callable[[Any], str] | None = None  # the session's own, once connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task | None = None

    async def rows(self, sql: str, params: Sequence, timeout: float) -> list[tuple]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(2):
            channel = self._channel
            if channel is None or channel.closed or self._loop is not loop:
                channel = await self._open(loop, deadline, timeout)
            try:
                escape = self._escape
                assert escape is not None  # set with the channel
                statement = sql % tuple(map(escape, params)) if params else sql
                future = channel.query(statement)
            except ConnectionLost as exc:
                error: Exception = exc
            else:
                timer = loop.call_at(deadline, _expire, channel, future, timeout)
                try:
                    return await future
                except ConnectionLost as exc:
                    error = exc
                except ServerError as exc:
                    raise MetaFailed(f"meta DB query failed: {exc}") from exc
                finally:
                    timer.cancel()
            if attempt or loop.time() >= deadline or isinstance(error, _Expired):
                raise MetaFailed(f"meta DB query failed: {error}") from error
        raise AssertionError("unreachable")

    async def _open(self, loop: asyncio.AbstractEventLoop, deadline: float, timeout: float) -> MysqlChannel:
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = loop.create_task(self._open_now(loop, timeout))
            opening.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(opening)
        except TimeoutError as exc:
            raise MetaFailed(f"meta DB query failed: no connection in {timeout:.1f} s") from exc
        except Unsupported:
            self.usable = False
            raise
        except Exception as exc:  # connect errors differ per cause (refused, auth, unknown DB)
            raise MetaFailed(f"meta DB unreachable: {exc.__class__.__name__}: {exc}") from exc

    async def _open_now(self, loop: asyncio.AbstractEventLoop, timeout: float) -> MysqlChannel:
        if self._channel is not None:
            try:
                self._channel.close()
            except RuntimeError:  # it belonged to an event loop that is closed now
                pass
            self._channel = None
        sock, session = await asyncio.to_thread(open_session, self._connect, self._args, self._params, timeout)
        try:
            _, channel = await loop.create_connection(lambda: MysqlChannel(session.encoding), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._channel, self._escape, self._loop = channel, session.escape, loop
        return channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class _Expired(ConnectionLost):
    """No answer in time."""


def _expire(channel: MysqlChannel, future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_exception(_Expired(f"no answer in {timeout:.1f} s"))
        channel.abort(f"an earlier statement got no answer in {timeout:.1f} s")


def _retrieve(task: asyncio.Task) -> None:
    """A connect attempt whose waiters all gave up still has its error looked at (no asyncio warning)."""
    if not task.cancelled():
        task.exception()


class SchemaCache:
    """Collection rows for routing, kept `ttl` seconds and dropped at once on changes made through the proxy."""

    def __init__(self, reader: MetaReader, ttl: float) -> None:
        self.reader = reader
        self.ttl = ttl
        self._entries: dict[str, tuple[float, CollectionTables | None]] = {}
        self._lock = threading.Lock()

    async def get(self, name: str, timeout: float) -> CollectionTables | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        value = await self.reader.collection(name, timeout)
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

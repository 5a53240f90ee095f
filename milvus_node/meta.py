"""The Milvus 0.9.1 meta database (`Environment`, `Tables`, `TableFiles`, `Fields`) via SQLAlchemy.

Every node of a cluster and the Mishards proxy share this database, so the schema, the state and
file_type values and the units (index_file_size in bytes, times in microseconds) are exactly
Milvus'. Each call runs in its own short transaction: on MySQL's REPEATABLE READ a long-lived
connection would read a stale snapshot of what the writable node has flushed since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.errors import MetaFailed
from utils.milvus_schema import IN_PROGRESS_FILE_TYPES, SEARCHABLE_FILE_TYPES, FileType, TableState

log = logging.getLogger(__name__)

# Tables.flag
FLAG_NO_USERID = 0x1
FLAG_HAS_USERID = 0x2

_BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

environment_table = sa.Table("Environment", metadata, sa.Column("global_lsn", sa.BigInteger, nullable=False))

tables_table = sa.Table(
    "Tables",
    metadata,
    sa.Column("id", _BIGINT_ID, primary_key=True, autoincrement=True),
    sa.Column("table_id", sa.String(255), unique=True, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("dimension", sa.SmallInteger, nullable=False),
    sa.Column("created_on", sa.BigInteger, nullable=False),
    sa.Column("flag", sa.BigInteger, server_default="0"),
    sa.Column("index_file_size", sa.BigInteger, server_default="1024"),
    sa.Column("engine_type", sa.Integer, server_default="1"),
    sa.Column("index_params", sa.String(512), nullable=False),
    sa.Column("metric_type", sa.Integer, server_default="1"),
    sa.Column("owner_table", sa.String(255), nullable=False),
    sa.Column("partition_tag", sa.String(255), nullable=False),
    sa.Column("version", sa.String(64), server_default="0.9.1"),
    sa.Column("flush_lsn", sa.BigInteger, server_default="0"),
    sqlite_autoincrement=True,
)

table_files_table = sa.Table(
    "TableFiles",
    metadata,
    sa.Column("id", _BIGINT_ID, primary_key=True, autoincrement=True),
    sa.Column("table_id", sa.String(255), nullable=False),
    sa.Column("segment_id", sa.String(255), nullable=False),
    sa.Column("engine_type", sa.Integer, server_default="1"),
    sa.Column("file_id", sa.String(255), nullable=False),
    sa.Column("file_type", sa.Integer, server_default="0"),
    sa.Column("file_size", sa.BigInteger, server_default="0"),
    sa.Column("row_count", sa.BigInteger, server_default="0"),
    sa.Column("updated_time", sa.BigInteger, nullable=False),
    sa.Column("created_on", sa.BigInteger, nullable=False),
    sa.Column("date", sa.Integer, server_default="-1"),
    sa.Column("flush_lsn", sa.BigInteger, server_default="0"),
    sqlite_autoincrement=True,
)

fields_table = sa.Table(
    "Fields",
    metadata,
    sa.Column("collection_id", sa.String(255)),
    sa.Column("field_name", sa.String(255)),
    sa.Column("field_type", sa.Integer, server_default="0"),
    sa.Column("field_params", sa.String(255)),
)


def now_us() -> int:
    return time.time_ns() // 1000


def legacy_date_key(moment: float | None = None) -> int:
    """Milvus' old partition-by-date key: tm_year*10000 + tm_mon*100 + tm_mday (tm_mon 0-based)."""
    t = time.gmtime(moment)
    return (t.tm_year - 1900) * 10000 + (t.tm_mon - 1) * 100 + t.tm_mday


@dataclass(frozen=True)
class TableRow:
    """A `Tables` row: a collection, or a partition when `owner_table` is set."""

    id: int
    table_id: str
    state: int
    dimension: int
    created_on: int
    flag: int
    index_file_size: int  # bytes
    engine_type: int
    index_params: str
    metric_type: int
    owner_table: str
    partition_tag: str
    version: str

    @property
    def is_partition(self) -> bool:
        return bool(self.owner_table)


@dataclass(frozen=True)
class FileRow:
    """A `TableFiles` row; `id` is the file id that SearchInFiles and ReloadSegments carry."""

    id: int
    table_id: str
    segment_id: str
    engine_type: int
    file_id: str
    file_type: int
    file_size: int
    row_count: int
    updated_time: int
    created_on: int
    date: int
    flush_lsn: int = 0  # highest WAL sequence number whose rows the file holds


def _table_row(row: sa.Row) -> TableRow:
    return TableRow(
        id=row.id,
        table_id=row.table_id,
        state=row.state,
        dimension=row.dimension,
        created_on=row.created_on,
        flag=row.flag or 0,
        index_file_size=row.index_file_size,
        engine_type=row.engine_type,
        index_params=row.index_params,
        metric_type=row.metric_type,
        owner_table=row.owner_table,
        partition_tag=row.partition_tag,
        version=row.version or "",
    )


def _file_row(row: sa.Row) -> FileRow:
    return FileRow(
        id=row.id,
        table_id=row.table_id,
        segment_id=row.segment_id,
        engine_type=row.engine_type,
        file_id=row.file_id,
        file_type=row.file_type,
        file_size=row.file_size,
        row_count=row.row_count,
        updated_time=row.updated_time,
        created_on=row.created_on,
        date=row.date,
        flush_lsn=row.flush_lsn or 0,
    )


def create_meta_engine(uri: str, echo: bool = False) -> Engine:
    """An engine for a Milvus meta URI; SQLite gets WAL mode so several nodes can share it."""
    if uri.startswith("sqlite"):
        engine = sa.create_engine(uri, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(uri, echo=echo, pool_pre_ping=True, pool_recycle=3600)


class MetaStore:
    """Reads and writes of the meta DB, one short transaction per call."""

    def __init__(self, engine: Engine, server_version: str = "0.9.1") -> None:
        self.engine = engine
        self.server_version = server_version

    # ------------------------------------------------------------------ schema
    def ensure_schema(self, create: bool) -> None:
        """Create missing tables (writers only) and refuse a schema that lacks a column, as Milvus does."""
        try:
            if create:
                metadata.create_all(self.engine, checkfirst=True)
            inspector = sa.inspect(self.engine)
            existing = set(inspector.get_table_names())
            for table in (tables_table, table_files_table):
                if table.name not in existing:
                    raise MetaFailed(f"meta table {table.name} does not exist yet; start the writable node first")
                have = {c["name"] for c in inspector.get_columns(table.name)}
                missing = [c.name for c in table.columns if c.name not in have]
                if missing:
                    raise MetaFailed(
                        f"meta table {table.name} lacks columns {missing}: schema is created by Milvus old version"
                    )
        except sa.exc.SQLAlchemyError as exc:
            raise MetaFailed(f"meta DB unavailable: {exc.__class__.__name__}: {exc}") from exc

    # ------------------------------------------------------------------ Tables
    def get_table(self, table_id: str, include_deleted: bool = False) -> TableRow | None:
        query = sa.select(tables_table).where(tables_table.c.table_id == table_id)
        if not include_deleted:
            query = query.where(tables_table.c.state != TableState.TO_DELETE)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _table_row(row) if row else None

    def family(self, name: str) -> list[TableRow]:
        """The live rows of a name and of the partitions it owns, in one query."""
        query = (
            sa.select(tables_table)
            .where(
                sa.or_(tables_table.c.table_id == name, tables_table.c.owner_table == name),
                tables_table.c.state != TableState.TO_DELETE,
            )
            .order_by(tables_table.c.id)
        )
        with self.engine.connect() as conn:
            return [_table_row(r) for r in conn.execute(query)]

    def list_collections(self) -> list[TableRow]:
        query = (
            sa.select(tables_table)
            .where(tables_table.c.state != TableState.TO_DELETE, tables_table.c.owner_table == "")
            .order_by(tables_table.c.id)
        )
        with self.engine.connect() as conn:
            return [_table_row(r) for r in conn.execute(query)]

    def list_partitions(self, collection: str) -> list[TableRow]:
        query = (
            sa.select(tables_table)
            .where(tables_table.c.state != TableState.TO_DELETE, tables_table.c.owner_table == collection)
            .order_by(tables_table.c.id)
        )
        with self.engine.connect() as conn:
            return [_table_row(r) for r in conn.execute(query)]

    def insert_table(
        self,
        *,
        table_id: str,
        dimension: int,
        index_file_size: int,
        metric_type: int,
        engine_type: int,
        index_params: str,
        owner_table: str = "",
        partition_tag: str = "",
        flag: int = 0,
    ) -> None:
        """Insert a collection or partition row, replacing a soft-deleted row of the same id."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(tables_table).where(
                    tables_table.c.table_id == table_id, tables_table.c.state == TableState.TO_DELETE
                )
            )
            conn.execute(
                sa.insert(tables_table).values(
                    table_id=table_id,
                    state=TableState.NORMAL,
                    dimension=dimension,
                    created_on=now_us(),
                    flag=flag,
                    index_file_size=index_file_size,
                    engine_type=engine_type,
                    index_params=index_params,
                    metric_type=metric_type,
                    owner_table=owner_table,
                    partition_tag=partition_tag,
                    version=self.server_version,
                    flush_lsn=0,
                )
            )

    def set_flag(self, table_id: str, flag: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(tables_table).where(tables_table.c.table_id == table_id).values(flag=flag))

    def set_index(self, collection: str, engine_type: int, index_params: str) -> None:
        """Record the index of a collection and all its partitions."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(tables_table)
                .where(sa.or_(tables_table.c.table_id == collection, tables_table.c.owner_table == collection))
                .values(engine_type=engine_type, index_params=index_params)
            )

    def soft_delete_tables(self, table_ids: Sequence[str]) -> None:
        """Milvus' soft delete: rows get state TO_DELETE and their files TO_DELETE; the cleaner purges them."""
        if not table_ids:
            return
        stamp = now_us()
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(tables_table).where(tables_table.c.table_id.in_(table_ids)).values(state=TableState.TO_DELETE)
            )
            conn.execute(
                sa.update(table_files_table)
                .where(table_files_table.c.table_id.in_(table_ids), table_files_table.c.file_type != FileType.TO_DELETE)
                .values(file_type=FileType.TO_DELETE, updated_time=stamp)
            )

    # ------------------------------------------------------------------ TableFiles
    def add_file(
        self,
        *,
        table_id: str,
        segment_id: str,
        file_id: str,
        file_type: int,
        engine_type: int,
        file_size: int,
        row_count: int,
        flush_lsn: int = 0,
    ) -> FileRow:
        stamp = now_us()
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.insert(table_files_table).values(
                    table_id=table_id,
                    segment_id=segment_id,
                    engine_type=engine_type,
                    file_id=file_id,
                    file_type=file_type,
                    file_size=file_size,
                    row_count=row_count,
                    updated_time=stamp,
                    created_on=stamp,
                    date=legacy_date_key(),
                    flush_lsn=flush_lsn,
                )
            )
            new_id = result.inserted_primary_key[0]
        return FileRow(
            new_id,
            table_id,
            segment_id,
            engine_type,
            file_id,
            file_type,
            file_size,
            row_count,
            stamp,
            stamp,
            legacy_date_key(),
            flush_lsn,
        )

    def files_of_tables(
        self, table_ids: Iterable[str], file_types: Sequence[int] = SEARCHABLE_FILE_TYPES
    ) -> list[FileRow]:
        table_ids = list(table_ids)
        if not table_ids:
            return []
        query = (
            sa.select(table_files_table)
            .where(table_files_table.c.table_id.in_(table_ids), table_files_table.c.file_type.in_(file_types))
            .order_by(table_files_table.c.id)
        )
        with self.engine.connect() as conn:
            return [_file_row(r) for r in conn.execute(query)]

    def files_of_types(self, file_types: Sequence[int], table_ids: Sequence[str] | None = None) -> list[FileRow]:
        """Files of the given types, of every table or only of `table_ids`."""
        query = sa.select(table_files_table).where(table_files_table.c.file_type.in_(list(file_types)))
        if table_ids is not None:
            query = query.where(table_files_table.c.table_id.in_(list(table_ids)))
        with self.engine.connect() as conn:
            return [_file_row(r) for r in conn.execute(query.order_by(table_files_table.c.id))]

    def max_flush_lsn(self, table_id: str | None = None) -> int:
        """Highest WAL sequence number already in a segment file (of one table, or of all)."""
        query = sa.select(sa.func.max(table_files_table.c.flush_lsn))
        if table_id is not None:
            query = query.where(table_files_table.c.table_id == table_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def segment_has_rows(self, table_id: str, segment_id: str) -> bool:
        query = (
            sa.select(table_files_table.c.id)
            .where(table_files_table.c.table_id == table_id, table_files_table.c.segment_id == segment_id)
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def segment_file_ids(self, table_id: str, segment_id: str) -> list[int]:
        """Live rows (raw, index, backup) of one segment: what retires together when it is rewritten."""
        query = sa.select(table_files_table.c.id).where(
            table_files_table.c.table_id == table_id,
            table_files_table.c.segment_id == segment_id,
            table_files_table.c.file_type.in_([FileType.RAW, FileType.TO_INDEX, FileType.INDEX, FileType.BACKUP]),
        )
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def update_segment_rows(self, table_id: str, segment_id: str, row_count: int) -> None:
        """After deletions were applied to a segment: live row count and a new `updated_time` on its
        raw and index rows (readers reload files whose `updated_time` changed). `file_size` stays:
        the bytes are on disk until Compact rewrites the segment, so data_size does not shrink."""
        stamp = now_us()
        segment = sa.and_(
            table_files_table.c.table_id == table_id,
            table_files_table.c.segment_id == segment_id,
            table_files_table.c.file_type != FileType.TO_DELETE,
        )
        with self.engine.begin() as conn:
            conn.execute(sa.update(table_files_table).where(segment).values(row_count=row_count, updated_time=stamp))

    def set_file_type(self, file_ids: Sequence[int], file_type: int) -> None:
        if not file_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(table_files_table)
                .where(table_files_table.c.id.in_(list(file_ids)))
                .values(file_type=file_type, updated_time=now_us())
            )

    def mark_to_index(self, table_ids: Sequence[str], min_rows: int) -> None:
        """RAW files of at least `min_rows` rows are queued for an index build (TO_INDEX)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(table_files_table)
                .where(
                    table_files_table.c.table_id.in_(list(table_ids)),
                    table_files_table.c.file_type == FileType.RAW,
                    table_files_table.c.row_count >= min_rows,
                )
                .values(file_type=FileType.TO_INDEX, updated_time=now_us())
            )

    def drop_index_files(self, table_ids: Sequence[str], raw_engine_type: int) -> list[int]:
        """Index files become TO_DELETE and their raw BACKUP (or queued TO_INDEX) files RAW again,
        in one transaction so every row stays searchable exactly once. Returns the retired ids."""
        stamp = now_us()
        tables = table_files_table.c.table_id.in_(list(table_ids))
        with self.engine.begin() as conn:
            retired = [
                r[0]
                for r in conn.execute(
                    sa.select(table_files_table.c.id).where(tables, table_files_table.c.file_type == FileType.INDEX)
                )
            ]
            conn.execute(
                sa.update(table_files_table)
                .where(tables, table_files_table.c.file_type.in_([FileType.INDEX, FileType.NEW_INDEX]))
                .values(file_type=FileType.TO_DELETE, updated_time=stamp)
            )
            conn.execute(
                sa.update(table_files_table)
                .where(tables, table_files_table.c.file_type.in_([FileType.BACKUP, FileType.TO_INDEX]))
                .values(file_type=FileType.RAW, engine_type=raw_engine_type, updated_time=stamp)
            )
        return retired

    def publish_index(self, new_id: int, source_id: int, file_size: int) -> bool:
        """NEW_INDEX -> INDEX and its TO_INDEX source -> BACKUP in one transaction; if the source was
        retired meanwhile (compaction, drop), the new file is retired instead. True when published."""
        stamp = now_us()
        with self.engine.begin() as conn:
            moved = conn.execute(
                sa.update(table_files_table)
                .where(table_files_table.c.id == source_id, table_files_table.c.file_type == FileType.TO_INDEX)
                .values(file_type=FileType.BACKUP, updated_time=stamp)
            ).rowcount
            conn.execute(
                sa.update(table_files_table)
                .where(table_files_table.c.id == new_id)
                .values(
                    file_type=FileType.INDEX if moved else FileType.TO_DELETE, file_size=file_size, updated_time=stamp
                )
            )
        return bool(moved)

    def files_by_ids(self, ids: Sequence[int]) -> list[FileRow]:
        if not ids:
            return []
        query = (
            sa.select(table_files_table).where(table_files_table.c.id.in_(list(ids))).order_by(table_files_table.c.id)
        )
        with self.engine.connect() as conn:
            return [_file_row(r) for r in conn.execute(query)]

    def files_to_purge(self, older_than_us: int) -> list[FileRow]:
        query = sa.select(table_files_table).where(
            table_files_table.c.file_type == FileType.TO_DELETE, table_files_table.c.updated_time < older_than_us
        )
        with self.engine.connect() as conn:
            return [_file_row(r) for r in conn.execute(query)]

    def replace_files(self, new_ids: Sequence[int], old_ids: Sequence[int], new_type: int) -> None:
        """Publish rewritten files and retire the originals in one transaction, so no reader sees both."""
        stamp = now_us()
        with self.engine.begin() as conn:
            if new_ids:
                conn.execute(
                    sa.update(table_files_table)
                    .where(table_files_table.c.id.in_(list(new_ids)))
                    .values(file_type=new_type, updated_time=stamp)
                )
            if old_ids:
                conn.execute(
                    sa.update(table_files_table)
                    .where(table_files_table.c.id.in_(list(old_ids)))
                    .values(file_type=FileType.TO_DELETE, updated_time=stamp)
                )

    def delete_file_rows(self, file_ids: Sequence[int]) -> None:
        if not file_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.delete(table_files_table).where(table_files_table.c.id.in_(list(file_ids))))

    def segment_keys(self) -> set[tuple[str, str]]:
        """(table_id, segment_id) of every file row: the segment dirs the meta DB knows."""
        query = sa.select(table_files_table.c.table_id, table_files_table.c.segment_id).distinct()
        with self.engine.connect() as conn:
            return {(r[0], r[1]) for r in conn.execute(query)}

    def delete_shadow_files(self) -> list[FileRow]:
        """At start-up a writer drops rows of files that were being written (NEW, NEW_MERGE, NEW_INDEX)."""
        shadow = IN_PROGRESS_FILE_TYPES
        with self.engine.begin() as conn:
            rows = [
                _file_row(r)
                for r in conn.execute(sa.select(table_files_table).where(table_files_table.c.file_type.in_(shadow)))
            ]
            conn.execute(sa.delete(table_files_table).where(table_files_table.c.file_type.in_(shadow)))
        return rows

    def purge_deleted_tables(self) -> int:
        """Remove soft-deleted `Tables` rows that no longer own any file row."""
        with self.engine.begin() as conn:
            owned = sa.select(table_files_table.c.id).where(table_files_table.c.table_id == tables_table.c.table_id)
            result = conn.execute(
                sa.delete(tables_table).where(tables_table.c.state == TableState.TO_DELETE, ~sa.exists(owned))
            )
            return result.rowcount or 0

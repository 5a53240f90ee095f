"""The proxy's meta reads on SQLite and on a real MariaDB: each read sees the latest commit, and
MySQL's held session (one autocommit connection read on the event loop) survives what a server
connection meets: pipelined concurrent reads, SQL errors, a killed session, a server that stops
answering or refuses connections, and comes back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from milvus_node.meta import MetaStore, create_meta_engine
from mishards.meta import MetaReader, SchemaCache, create_engine
from utils.errors import MetaFailed

OTHER_SESSIONS = "DB = DATABASE() AND ID <> CONNECTION_ID()"


def proxy_reader(uri: str) -> MetaReader:
    return MetaReader(
        create_engine(
            uri, echo=False, pool_size=4, pool_recycle=3600, pool_timeout=5, pool_pre_ping=True, max_overflow=0
        )
    )


def writer(uri: str) -> MetaStore:
    store = MetaStore(create_meta_engine(uri))
    store.ensure_schema(True)
    return store


def add_collection(store: MetaStore, name: str, files: int) -> None:
    store.insert_table(table_id=name, dimension=8, index_file_size=1024, metric_type=1, engine_type=1, index_params="")
    for segment in range(files):
        add_file(store, name, segment)


def add_file(store: MetaStore, table_id: str, segment: int) -> int:
    row = store.add_file(
        table_id=table_id,
        segment_id=f"s{segment}",
        file_id=f"f{segment}",
        file_type=1,
        engine_type=1,
        file_size=1,
        row_count=1,
    )
    return row.id


@pytest.fixture(params=["sqlite", "mysql", "mysql-pooled"])
def meta_uri(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/meta.sqlite"
        return
    yield request.getfixturevalue("mysql_db_url")


def test_every_read_sees_the_latest_commit(meta_uri, request):
    store = writer(meta_uri)
    add_collection(store, "seen", 1)
    reader = proxy_reader(meta_uri)
    if request.node.callspec.params["meta_uri"] == "mysql-pooled":
        reader._session = None  # the path of MySQL URLs with TLS or another driver: pooled, on a thread
    schemas = SchemaCache(reader, ttl=60.0)

    async def scenario() -> None:
        assert (await schemas.get("seen", 5.0)).table_ids() == ["seen"]
        before = await reader.searchable_files(["seen"], 5.0)
        for segment in range(1, 6):  # the same held connection must see each new commit at once
            new_id = add_file(store, "seen", segment)
            files = await reader.searchable_files(["seen"], 5.0)
            assert files.ids[-1] == str(new_id) and len(files) == len(before) + segment
            assert files.updated.dtype.kind == "i" and files.updated[-1] > 0
        store.insert_table(
            table_id="seen_p",
            dimension=8,
            index_file_size=1024,
            metric_type=1,
            engine_type=1,
            index_params="",
            owner_table="seen",
            partition_tag="tag",
        )
        found = await reader.collection("seen", 5.0)
        assert found.partitions == (("seen_p", "tag"),) and found.metric_type == 1 and found.dimension == 8
        assert await reader.collection("missing", 5.0) is None
        rows = await reader.files_by_ids([int(files.ids[0]), 987654321], 5.0)
        assert [(str(r[0]), r[1], r[2]) for r in rows] == [(files.ids[0], "seen", 1)]
        await reader.close()

    asyncio.run(scenario())


@pytest.fixture
def mysql_meta(mysql_db_url) -> Iterator[tuple[str, MetaStore]]:
    store = writer(mysql_db_url)
    for index in range(8):
        add_collection(store, f"c{index}", index + 1)
    yield mysql_db_url, store
    store.engine.dispose()


def test_concurrent_reads_share_one_pipelined_session(mysql_meta):
    uri, store = mysql_meta
    store.engine.dispose()  # only the reader's sessions remain on this database
    reader = proxy_reader(uri)
    server = sa.create_engine(uri)

    async def scenario() -> None:
        names = [f"c{i % 8}" for i in range(64)]
        results = await asyncio.gather(*(reader.searchable_files([name], 5.0) for name in names))
        assert [len(files) for files in results] == [int(name[1:]) + 1 for name in names]
        tables = await asyncio.gather(*(reader.collection(name, 5.0) for name in names))
        assert [table.name for table in tables] == names
        with server.connect() as connection:
            sessions = connection.execute(
                sa.text(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE {OTHER_SESSIONS}")
            ).scalar()
        assert sessions == 1, "every read went over the one held session"
        await reader.close()

    asyncio.run(scenario())
    server.dispose()


def test_sql_error_is_a_meta_failure_and_the_session_stays(mysql_meta):
    uri, store = mysql_meta
    reader = proxy_reader(uri)

    async def scenario() -> None:
        assert len(await reader.searchable_files(["c2"], 5.0)) == 3
        with pytest.raises(MetaFailed, match="1146"):  # ER_NO_SUCH_TABLE: the server's own reason
            await reader._rows("SELECT id FROM NoSuchTable WHERE id = %s", (1,), 5.0)
        channel = reader._session._channel
        assert len(await reader.searchable_files(["c2"], 5.0)) == 3
        assert reader._session._channel is channel and not channel.closed
        # names are quoted by the session's own rules, so a hostile one is only a name
        assert await reader.collection("x' OR '1'='1", 5.0) is None
        assert len(await reader.searchable_files(["c1') OR ('1'='1"], 5.0)) == 0
        await reader.close()

    asyncio.run(scenario())


def test_a_killed_session_is_replaced_without_failing_a_read(mysql_meta):
    uri, store = mysql_meta
    store.engine.dispose()
    reader = proxy_reader(uri)
    server = sa.create_engine(uri)

    def kill_reader_sessions() -> int:
        with server.connect() as connection:
            ids = connection.execute(
                sa.text(f"SELECT ID FROM information_schema.PROCESSLIST WHERE {OTHER_SESSIONS}")
            ).scalars()
            killed = 0
            for session_id in list(ids):
                connection.execute(sa.text(f"KILL CONNECTION {int(session_id)}"))
                killed += 1
        return killed

    async def scenario() -> None:
        assert len(await reader.searchable_files(["c4"], 5.0)) == 5
        for _ in range(3):
            assert await asyncio.to_thread(kill_reader_sessions) == 1
            await asyncio.sleep(0.05)  # usually the close is seen before the next read; the retry covers the rest
            assert len(await reader.searchable_files(["c4"], 5.0)) == 5
        # killed while statements run on the server and more wait behind them: each is sent again
        # on a new session and answered (each statement sleeps 0.1 s per file row: 0.4 s)
        slow = "SELECT id FROM TableFiles WHERE table_id = %s AND SLEEP(0.1) = 0"
        reads = [asyncio.ensure_future(reader._rows(slow, ("c3",), 10.0)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(kill_reader_sessions) == 1
        assert [len(rows) for rows in await asyncio.gather(*reads)] == [4, 4, 4]
        await reader.close()

    asyncio.run(scenario())
    server.dispose()


class Forwarder:
    """A TCP relay to the real MariaDB that a test can make silent (a peer that stops answering) or cut."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.sockets: list[socket.socket] = []
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        self.closing = True
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_outage_is_a_bounded_meta_failure_and_reads_recover(mysql_meta):
    uri, _ = mysql_meta
    url = sa.make_url(uri)
    relay = Forwarder((url.host, url.port))
    reader = proxy_reader(url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False))

    async def scenario() -> None:
        assert len(await reader.searchable_files(["c5"], 5.0)) == 6
        relay.silent.set()  # the server stops answering: the read fails after its time, never hangs
        started = time.monotonic()
        with pytest.raises(MetaFailed, match="no answer in 1.5 s"):
            await reader.searchable_files(["c5"], 1.5)
        assert 1.4 < time.monotonic() - started < 3.0
        relay.silent.clear()  # answering again: a fresh session is opened for the next read
        assert len(await reader.searchable_files(["c5"], 5.0)) == 6
        relay.cut()  # the server is gone: refused at once, a clear reason
        started = time.monotonic()
        with pytest.raises(MetaFailed, match="unreachable"):
            await reader.searchable_files(["c5"], 5.0)
        assert time.monotonic() - started < 3.0
        back = Forwarder((url.host, url.port), port=relay.port)  # the server is back
        assert len(await reader.searchable_files(["c5"], 5.0)) == 6
        await reader.close()
        back.cut()

    asyncio.run(scenario())

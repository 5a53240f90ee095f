"""Through a real proxy: a flush on the writable node is seen by the very next search (SQLite and
MariaDB meta), and a MariaDB that stops and starts again gives a clear META_FAILED meanwhile,
never a hang, and searches work again as soon as it is back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from milvus_node.meta import MetaStore, create_meta_engine
from tests.support.processes import ROOT, ManagedProcess, MishardsProcess, cmd_version_probe, free_port
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.errors import Code


def test_a_flush_on_the_writable_node_is_seen_by_the_next_search_through_the_proxy(cluster):
    name = "flushed_elsewhere"
    rng = np.random.default_rng(7)
    with milvus_stub(cluster.writable.address) as node, milvus_stub(cluster.proxy.address) as proxy:
        schema = pb.CollectionSchema(collection_name=name, dimension=8, index_file_size=1024, metric_type=1)
        assert node.CreateCollection(schema).error_code == 0
        try:
            for batch in range(6):
                vectors = rng.random((10, 8)).astype(np.float32)
                ids = list(range(batch * 100, batch * 100 + 10))
                insert = pb.InsertParam(collection_name=name, row_record_array=records(vectors), row_id_array=ids)
                assert node.Insert(insert, timeout=30).status.error_code == 0
                assert node.Flush(pb.FlushParam(collection_name_array=[name]), timeout=30).error_code == 0
                # no pause: the file list the proxy reads must already hold the new segment
                reply = proxy.Search(search_param(name, vectors[3:5], 1), timeout=30)
                assert reply.status.error_code == 0, reply.status
                found, distances = result_rows(reply)
                assert found == [[ids[3]], [ids[4]]], f"batch {batch}: the flushed rows were not searched"
                assert max(d[0] for d in distances) < 1e-5
        finally:
            node.DropCollection(pb.CollectionName(collection_name=name), timeout=30)


class PrivateMariaDB:
    """A MariaDB of this test alone (scripts/mariadb.sh on a free port, data under tmp), so it may be stopped."""

    def __init__(self, base: Path) -> None:
        self.env = dict(os.environ, MISHARDS_MYSQL_PORT=str(free_port()), MISHARDS_MYSQL_BASE=str(base))

    def run(self, action: str) -> str:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "mariadb.sh"), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@pytest.fixture
def private_mariadb(mysql_url, tmp_path):
    """Needs the MariaDB that `make test` uses (the same binaries), so it skips where that does."""
    if shutil.which("mariadbd") is None:
        pytest.skip("mariadbd is not installed")
    db = PrivateMariaDB(tmp_path / "mariadb")
    db.run("start")
    try:
        yield db
    finally:
        db.run("stop")


def test_a_meta_db_restart_gives_meta_failed_then_searches_recover(private_mariadb, tmp_path):
    url = private_mariadb.run("url")
    store = MetaStore(create_meta_engine(url))
    store.ensure_schema(True)
    store.insert_table(
        table_id="kept", dimension=8, index_file_size=1024, metric_type=1, engine_type=1, index_params=""
    )
    for segment in range(4):
        store.add_file(
            table_id="kept",
            segment_id=f"s{segment}",
            file_id=f"f{segment}",
            file_type=1,
            engine_type=1,
            file_size=1,
            row_count=1,
        )
    store.engine.dispose()
    ports = [free_port() for _ in range(3)]
    fake_nodes = ManagedProcess(
        "fake nodes",
        [sys.executable, "-m", "tests.support.fake_node", *map(str, ports)],
        cmd_version_probe(f"127.0.0.1:{ports[0]}"),
        tmp_path / "fake-nodes.log",
    )
    proxy = MishardsProcess(
        woserver=f"127.0.0.1:{ports[2]}",
        meta_uri=url,
        ro_addresses=[f"127.0.0.1:{port}" for port in ports[:2]],
        log_dir=tmp_path,
        extra_env={"TIMEOUT": "5", "SCHEMA_CACHE_TTL": "0"},
    )
    request = search_param("kept", np.zeros((1, 8), np.float32), 3)
    with fake_nodes, proxy, milvus_stub(proxy.address) as stub:
        assert stub.Search(request, timeout=30).status.error_code == 0
        private_mariadb.run("stop")
        for _ in range(2):
            started = time.monotonic()
            reply = stub.Search(request, timeout=30)
            assert reply.status.error_code == Code.META_FAILED, reply.status
            assert "meta DB" in reply.status.reason
            assert time.monotonic() - started < 6.0, "an outage is a prompt error, not a hang"
        private_mariadb.run("start")
        reply = stub.Search(request, timeout=30)
        assert reply.status.error_code == 0, reply.status
        assert len(result_rows(reply)[0][0]) == 3

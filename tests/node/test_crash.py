"""kill -9 of the writable node: acknowledged inserts and deletes survive, exactly once.

Crashes in the middle of a flush, an index build, a compaction or a merge are placed exactly by
running the node as tests.support.crashing_node: it SIGKILLs itself at the named crash point of
milvus_node/crash_points.py (a real kill -9, at a known step).
After every restart, every acknowledged row is counted and stored exactly once and searchable,
and no deleted id comes back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, result_rows, search_param

DIM = 8
NAME = "durable"


class Cluster:
    """One writable node on a private meta DB and data dir, restartable, with what it acknowledged."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.meta = f"sqlite:///{base}/meta.sqlite"
        self.rng = np.random.default_rng(0)
        self.vectors: dict[int, np.ndarray] = {}
        self.deleted: set[int] = set()
        self.next_id = 1
        self.node: NodeProcess | None = None

    def start(self, crash_at: str = "", extra: tuple[str, ...] = ()) -> NodeProcess:
        crash = ("--crash-at", crash_at) if crash_at else ()
        self.node = NodeProcess(
            "writable",
            self.meta,
            self.base / "data",
            log_dir=self.base,
            extra_args=["--auto-flush-interval", "0", "--merge-after", "-1", *extra, *crash],
            module="tests.support.crashing_node" if crash_at else "milvus_node",
        ).start()
        return self.node

    def call(self, method: str, request, timeout: float = 60):
        with milvus_stub(self.node.address) as stub:
            return getattr(stub, method)(request, timeout=timeout)

    def insert(self, n: int, dim: int = DIM) -> None:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        vectors = self.rng.random((n, dim)).astype(np.float32)
        reply = self.call(
            "Insert", pb.InsertParam(collection_name=NAME, row_record_array=records(vectors), row_id_array=ids)
        )
        assert reply.status.error_code == 0, reply.status
        self.vectors.update(zip(ids, vectors, strict=True))

    def delete(self, ids: list[int]) -> None:
        assert self.call("DeleteByID", pb.DeleteByIDParam(collection_name=NAME, id_array=ids)).error_code == 0
        self.deleted.update(ids)

    def flush(self) -> None:
        assert self.call("Flush", pb.FlushParam(collection_name_array=[NAME])).error_code == 0

    def crash_during(self, method: str, request) -> None:
        """Send the request that reaches the crash point; the node must die of SIGKILL."""
        with pytest.raises(grpc.RpcError):
            self.call(method, request, timeout=60)
        deadline = time.monotonic() + 30
        while self.node.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.node.returncode == -9, "the node did not reach the crash point"
        self.node.stop()

    def kill(self) -> None:
        self.node.kill()

    def file_types(self) -> list[int]:
        engine = sa.create_engine(self.meta)
        try:
            with engine.connect() as conn:
                return sorted(r[0] for r in conn.execute(sa.text("SELECT file_type FROM TableFiles")))
        finally:
            engine.dispose()

    def check(self) -> None:
        """Every acknowledged live row stored exactly once, counted, searchable; deleted ids gone."""
        live = sorted(set(self.vectors) - self.deleted)
        reply = self.call("CountCollection", pb.CollectionName(collection_name=NAME))
        assert reply.status.error_code == 0, reply.status
        assert reply.collection_row_count == len(live)
        info = json.loads(self.call("ShowCollectionInfo", pb.CollectionName(collection_name=NAME)).json_info)
        stored = []
        for partition in info["partitions"]:
            for segment in partition["segments"]:
                got = self.call(
                    "GetVectorIDs", pb.GetVectorIDsParam(collection_name=NAME, segment_name=segment["name"])
                )
                stored.extend(got.vector_id_array)
        assert sorted(stored) == live, "every acknowledged row exactly once, no deleted row"
        sample = live[:: max(1, len(live) // 20)]
        reply = self.call(
            "Search", search_param(NAME, np.stack([self.vectors[i] for i in sample]), 1, params='{"nprobe": 64}')
        )
        assert [row[0] for row in result_rows(reply)[0]] == sample
        gone = sorted(self.deleted)[:20]
        if gone:
            reply = self.call(
                "Search", search_param(NAME, np.stack([self.vectors[i] for i in gone]), 5, params='{"nprobe": 64}')
            )
            assert not set(np.ravel(result_rows(reply)[0]).tolist()) & self.deleted
            got = self.call("GetVectorsByID", pb.VectorsIdentity(collection_name=NAME, id_array=gone))
            assert all(not r.float_data for r in got.vectors_data)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.start()
    assert (
        c.call(
            "CreateCollection",
            pb.CollectionSchema(collection_name=NAME, dimension=DIM, index_file_size=1, metric_type=1),
        ).error_code
        == 0
    )
    yield c
    if c.node is not None:
        c.node.stop()


def test_acknowledged_inserts_and_deletes_survive_kill_9(cluster):
    cluster.insert(200)
    cluster.flush()
    for _ in range(3):
        cluster.insert(100)
    cluster.delete([5, 6, 7, 250, 251])  # flushed and unflushed rows
    cluster.insert(50)
    cluster.kill()
    cluster.start()
    cluster.check()
    cluster.delete([8, 300])
    cluster.kill()  # the second crash replays only what the first recovery did not flush
    cluster.start()
    cluster.check()


def test_a_torn_wal_tail_is_ignored(cluster):
    cluster.insert(120)
    cluster.delete([3])
    cluster.kill()
    wal_dir = Path(cluster.node.data_dir) / "wal"
    last = sorted(wal_dir.glob("*.wal"))[-1]
    with open(last, "ab") as f:  # a record cut short by the crash: a header promising more bytes
        f.write(b"\xff\x00\x00\x00\x12\x34")
    cluster.start()
    cluster.check()


@pytest.mark.parametrize("point", ["flush.segment_written", "flush.before_wal_retire"])
def test_kill_9_during_flush(cluster, point):
    cluster.insert(150)
    cluster.flush()
    cluster.node.stop()
    cluster.start(crash_at=point)
    cluster.insert(100)
    cluster.delete([10, 11, 160])
    cluster.crash_during("Flush", pb.FlushParam(collection_name_array=[NAME]))
    cluster.start()
    cluster.check()
    assert 0 not in cluster.file_types() and 5 not in cluster.file_types()
    segment_dirs = list((Path(cluster.node.data_dir) / "db" / "tables" / NAME).iterdir())
    assert len(segment_dirs) == len(cluster.file_types()), "no segment dir without a meta row"


def test_kill_9_during_index_build(cluster):
    cluster.insert(5000)  # 5000 x 8 floats is below 1 MB; one segment of 40000 rows is above
    cluster.insert(35000)
    cluster.flush()
    cluster.node.stop()
    cluster.start(crash_at="index.file_written")
    index = pb.IndexParam(
        collection_name=NAME, index_type=2, extra_params=[pb.KeyValuePair(key="params", value='{"nlist": 64}')]
    )
    cluster.crash_during("CreateIndex", index)
    cluster.start()
    deadline = time.monotonic() + 30  # the index thread rebuilds the TO_INDEX file left behind
    while cluster.file_types() != [3, 7] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.file_types() == [3, 7], "INDEX + BACKUP, the crashed NEW_INDEX row is gone"
    segment_dir = next((Path(cluster.node.data_dir) / "db" / "tables" / NAME).iterdir())
    assert len([p for p in segment_dir.iterdir() if "." not in p.name and p.name != "deleted_docs"]) == 1
    cluster.check()


def test_kill_9_during_compaction(cluster):
    cluster.insert(300)
    cluster.flush()
    cluster.delete(list(range(1, 60)))
    cluster.flush()
    cluster.node.stop()
    cluster.start(crash_at="compact.new_file_written")
    cluster.crash_during("Compact", pb.CollectionName(collection_name=NAME))
    cluster.start()
    cluster.check()
    assert cluster.file_types() == [1], "the NEW_MERGE output of the crashed compaction is gone"
    assert cluster.call("Compact", pb.CollectionName(collection_name=NAME)).error_code == 0
    assert cluster.file_types() == [1, 4], "compacted: new RAW file, the old one TO_DELETE"
    cluster.check()


def test_kill_9_during_background_merge(cluster):
    for _ in range(3):
        cluster.insert(100)
        cluster.flush()
    cluster.delete([1, 150])
    cluster.flush()
    cluster.node.stop()
    cluster.start(crash_at="merge.new_file_written", extra=("--merge-after", "0"))
    deadline = time.monotonic() + 30
    while cluster.node.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.node.returncode == -9, "the background merge did not run"
    cluster.node.stop()
    cluster.start()
    cluster.check()
    assert cluster.file_types() == [1, 1, 1]
    cluster.node.stop()
    cluster.start(extra=("--merge-after", "0"))  # a merge that completes: one RAW file, three TO_DELETE
    deadline = time.monotonic() + 30
    while cluster.file_types() != [1, 4, 4, 4] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.file_types() == [1, 4, 4, 4]
    cluster.check()

"""Index files in a cluster: a read-only node serves SearchInFiles on INDEX files, sees deletions
after ReloadSegments, and compaction of an indexed segment goes NEW_MERGE -> TO_INDEX -> INDEX."""

from __future__ import annotations

import time

import numpy as np
import sqlalchemy as sa

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.milvus_schema import FileType

DIM, ROWS = 32, 9000  # 9000 x 32 floats: above index_file_size = 1 MB


def files(meta_uri: str) -> list[tuple[int, int, int]]:
    """(id, file_type, updated_time) of every file row."""
    engine = sa.create_engine(meta_uri)
    try:
        with engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(sa.text("SELECT id, file_type, updated_time FROM TableFiles ORDER BY id"))
            ]
    finally:
        engine.dispose()


def wait_for(predicate, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    return predicate()


def test_read_only_node_searches_index_files_and_compaction_reindexes(tmp_path):
    meta = f"sqlite:///{tmp_path}/meta.sqlite"
    data = tmp_path / "data"
    with (
        NodeProcess("writable", meta, data, log_dir=tmp_path, extra_args=["--auto-flush-interval", "0"]) as writer,
        NodeProcess("readonly", meta, data, log_dir=tmp_path) as reader,
        milvus_stub(writer.address) as w,
        milvus_stub(reader.address) as r,
    ):
        assert (
            w.CreateCollection(
                pb.CollectionSchema(collection_name="c", dimension=DIM, index_file_size=1, metric_type=1)
            ).error_code
            == 0
        )
        vectors = np.random.default_rng(3).random((ROWS, DIM)).astype(np.float32)
        ids = np.arange(ROWS, dtype=np.int64) + 1
        assert (
            w.Insert(
                pb.InsertParam(collection_name="c", row_record_array=records(vectors), row_id_array=ids.tolist())
            ).status.error_code
            == 0
        )
        index = pb.IndexParam(
            collection_name="c", index_type=2, extra_params=[pb.KeyValuePair(key="params", value='{"nlist": 16}')]
        )
        assert w.CreateIndex(index).error_code == 0
        ((index_id, _, stamp),) = [f for f in files(meta) if f[1] == FileType.INDEX]

        queries = vectors[:5]
        exhaustive = '{"nprobe": 16}'  # every list: the index answers exactly
        reply = r.SearchInFiles(
            pb.SearchInFilesParam(
                file_id_array=[str(index_id)], search_param=search_param("c", queries, 10, params=exhaustive)
            )
        )
        assert reply.status.error_code == 0, reply.status
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, queries, vectors, ids, 10))

        assert w.DeleteByID(pb.DeleteByIDParam(collection_name="c", id_array=[1, 2])).error_code == 0
        assert w.Flush(pb.FlushParam(collection_name_array=["c"])).error_code == 0
        ((_, _, new_stamp),) = [f for f in files(meta) if f[0] == index_id]
        assert new_stamp > stamp, "deletions bump updated_time of the INDEX row"
        assert (
            r.ReloadSegments(pb.ReLoadSegmentsParam(collection_name="c", segment_id_array=[str(index_id)])).error_code
            == 0
        )
        reply = r.SearchInFiles(
            pb.SearchInFilesParam(
                file_id_array=[str(index_id)], search_param=search_param("c", queries, 10, params=exhaustive)
            )
        )
        keep = ids > 2
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, queries, vectors[keep], ids[keep], 10))

        assert w.Compact(pb.CollectionName(collection_name="c")).error_code == 0
        assert sorted(f[1] for f in files(meta) if f[0] <= index_id) == [FileType.TO_DELETE, FileType.TO_DELETE], (
            "INDEX and BACKUP retired"
        )
        assert wait_for(
            lambda: sorted(f[1] for f in files(meta) if f[1] != FileType.TO_DELETE) == [FileType.INDEX, FileType.BACKUP]
        ), files(meta)
        assert w.CountCollection(pb.CollectionName(collection_name="c")).collection_row_count == ROWS - 2
        reply = w.Search(search_param("c", queries, 10, params=exhaustive))
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, queries, vectors[keep], ids[keep], 10))

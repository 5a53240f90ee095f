"""One writable and two read-only nodes on one meta DB and one data directory, SQLite and MariaDB."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import NodeProcess
from tests.support.stubs import milvus_stub, records, result_rows, search_param
from utils.milvus_schema import MetricType

UNEXPECTED_ERROR = 1


@pytest.fixture(params=["sqlite", "mysql"])
def meta_uri(request, tmp_data_dir):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_data_dir}/meta.sqlite"
    return request.getfixturevalue("mysql_db_url")


def searchable_file_ids(meta_uri: str, collection: str) -> list[str]:
    engine = sa.create_engine(meta_uri)
    try:
        with engine.connect() as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    sa.text("SELECT id FROM TableFiles WHERE table_id = :t AND file_type IN (1, 2, 3) ORDER BY id"),
                    {"t": collection},
                )
            ]
    finally:
        engine.dispose()


def test_readonly_nodes_serve_flushed_data_and_see_deletes_after_reload(meta_uri, tmp_data_dir, tmp_path):
    # auto-flush off: every flush in this test is explicit
    with (
        NodeProcess(
            "writable", meta_uri, tmp_data_dir, log_dir=tmp_path, extra_args=["--auto-flush-interval", "0"]
        ) as writer,
        NodeProcess("readonly", meta_uri, tmp_data_dir, log_dir=tmp_path) as ro1,
        NodeProcess("readonly", meta_uri, tmp_data_dir, log_dir=tmp_path) as ro2,
        milvus_stub(writer.address) as w,
        milvus_stub(ro1.address) as r1,
        milvus_stub(ro2.address) as r2,
    ):
        dim = 16
        assert (
            w.CreateCollection(
                pb.CollectionSchema(collection_name="shared", dimension=dim, index_file_size=1024, metric_type=1)
            ).error_code
            == 0
        )
        rng = np.random.default_rng(0)
        vectors = rng.random((600, dim)).astype(np.float32)
        ids = np.arange(600, dtype=np.int64) + 10
        for chunk in range(3):  # three segments
            part = slice(chunk * 200, (chunk + 1) * 200)
            reply = w.Insert(
                pb.InsertParam(
                    collection_name="shared", row_record_array=records(vectors[part]), row_id_array=ids[part].tolist()
                )
            )
            assert reply.status.error_code == 0
            assert w.Flush(pb.FlushParam(collection_name_array=["shared"])).error_code == 0
        files = searchable_file_ids(meta_uri, "shared")
        assert len(files) == 3

        queries = np.vstack([rng.random((3, dim)).astype(np.float32), vectors[[5, 250]]])
        expected = oracle.brute_force(MetricType.L2, queries, vectors, ids, 10)
        for ro in (r1, r2):
            assert ro.HasCollection(pb.CollectionName(collection_name="shared")).bool_reply
            assert ro.CountCollection(pb.CollectionName(collection_name="shared")).collection_row_count == 600
            reply = ro.SearchInFiles(
                pb.SearchInFilesParam(file_id_array=files, search_param=search_param("shared", queries, 10))
            )
            assert reply.status.error_code == 0, reply.status
            oracle.assert_same_result(*result_rows(reply), expected)
        # one file alone
        reply = r2.SearchInFiles(
            pb.SearchInFilesParam(file_id_array=files[1:2], search_param=search_param("shared", queries, 10))
        )
        oracle.assert_same_result(
            *result_rows(reply), oracle.brute_force(MetricType.L2, queries, vectors[200:400], ids[200:400], 10)
        )

        # read-only nodes never write
        for ro in (r1, r2):
            status = ro.Insert(
                pb.InsertParam(collection_name="shared", row_record_array=records(vectors[:1]), row_id_array=[1])
            ).status
            assert status.error_code == UNEXPECTED_ERROR and "read-only" in status.reason
            assert ro.Flush(pb.FlushParam()).error_code == UNEXPECTED_ERROR
            assert (
                ro.CreateCollection(
                    pb.CollectionSchema(collection_name="x", dimension=4, index_file_size=1, metric_type=1)
                ).error_code
                == UNEXPECTED_ERROR
            )

        # delete the nearest neighbours of the last two queries (ids 15 and 260) on the writer
        doomed = [15, 260]
        assert w.DeleteByID(pb.DeleteByIDParam(collection_name="shared", id_array=doomed)).error_code == 0
        assert w.Flush(pb.FlushParam(collection_name_array=["shared"])).error_code == 0
        assert searchable_file_ids(meta_uri, "shared") == files, "deletes keep the file ids"
        keep = ~np.isin(ids, doomed)
        after = oracle.brute_force(MetricType.L2, queries, vectors[keep], ids[keep], 10)
        writer_reply = w.Search(search_param("shared", queries, 10))
        oracle.assert_same_result(*result_rows(writer_reply), after)

        # the read-only node still serves its cached segments until told to reload
        stale = r1.SearchInFiles(
            pb.SearchInFilesParam(file_id_array=files, search_param=search_param("shared", queries, 10))
        )
        assert 15 in result_rows(stale)[0][3]
        assert (
            r1.ReloadSegments(pb.ReLoadSegmentsParam(collection_name="shared", segment_id_array=files)).error_code == 0
        )
        for ro in (r1, r2):  # r2 loaded the files before the delete too
            ro.ReloadSegments(pb.ReLoadSegmentsParam(collection_name="shared", segment_id_array=files))
            reply = ro.SearchInFiles(
                pb.SearchInFilesParam(file_id_array=files, search_param=search_param("shared", queries, 10))
            )
            oracle.assert_same_result(*result_rows(reply), after)

        # a file the read-only node had never loaded is read with its current deletions
        with NodeProcess("readonly", meta_uri, tmp_data_dir, log_dir=tmp_path) as ro3, milvus_stub(ro3.address) as r3:
            reply = r3.SearchInFiles(
                pb.SearchInFilesParam(file_id_array=files, search_param=search_param("shared", queries, 10))
            )
            oracle.assert_same_result(*result_rows(reply), after)


def test_files_replaced_after_routing_are_still_searched(tmp_data_dir, tmp_path):
    """A proxy reads file ids, then the writable node compacts them away: SearchInFiles with the old
    ids must still return every row those files held (they stay on disk until the TTL cleaner)."""
    meta_uri = f"sqlite:///{tmp_data_dir}/meta.sqlite"
    with (
        NodeProcess(
            "writable", meta_uri, tmp_data_dir, log_dir=tmp_path, extra_args=["--auto-flush-interval", "0"]
        ) as w_node,
        NodeProcess("readonly", meta_uri, tmp_data_dir, log_dir=tmp_path) as ro_node,
        milvus_stub(w_node.address) as w,
        milvus_stub(ro_node.address) as ro,
    ):
        schema = pb.CollectionSchema(collection_name="moving", dimension=8, index_file_size=1024, metric_type=1)
        assert w.CreateCollection(schema).error_code == 0
        vectors = np.random.default_rng(3).random((200, 8)).astype(np.float32)
        ids = np.arange(200, dtype=np.int64) + 1
        for part in (slice(0, 100), slice(100, 200)):
            reply = w.Insert(
                pb.InsertParam(
                    collection_name="moving", row_record_array=records(vectors[part]), row_id_array=ids[part].tolist()
                )
            )
            assert reply.status.error_code == 0
            assert w.Flush(pb.FlushParam(collection_name_array=["moving"])).error_code == 0
        routed = searchable_file_ids(meta_uri, "moving")  # what a proxy read
        assert w.DeleteByID(pb.DeleteByIDParam(collection_name="moving", id_array=[1, 150])).error_code == 0
        assert w.Flush(pb.FlushParam(collection_name_array=["moving"])).error_code == 0
        assert w.Compact(pb.CollectionName(collection_name="moving")).error_code == 0
        assert set(searchable_file_ids(meta_uri, "moving")).isdisjoint(routed), "the routed files were replaced"
        queries = vectors[[10, 120]]
        reply = ro.SearchInFiles(
            pb.SearchInFilesParam(file_id_array=routed, search_param=search_param("moving", queries, 5))
        )
        assert reply.status.error_code == 0, reply.status
        keep = ~np.isin(ids, [1, 150])
        oracle.assert_same_result(
            *result_rows(reply), oracle.brute_force(MetricType.L2, queries, vectors[keep], ids[keep], 5)
        )

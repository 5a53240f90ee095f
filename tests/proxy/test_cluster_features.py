"""Proxy features beyond the plain client calls: 0.2.14 clients, stacking, schema TTL, reloads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.support import oracle
from tests.support.processes import MishardsProcess
from tests.support.pymilvus_client import PymilvusClient
from tests.support.stubs import milvus_stub, records, result_rows, search_param

from .conftest import start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    c = start_cluster(f"sqlite:///{base}/meta.sqlite", base, proxy_env={"SCHEMA_CACHE_TTL": "1"})
    yield c
    c.stop()


def load(address: str, name: str, n: int = 300, dim: int = 8, segments: int = 4, metric: int = 1):
    vectors = np.random.default_rng(len(name)).random((n, dim)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) + 1000
    with milvus_stub(address) as stub:
        assert (
            stub.CreateCollection(
                pb.CollectionSchema(collection_name=name, dimension=dim, index_file_size=1, metric_type=metric)
            ).error_code
            == 0
        )
        for part in np.array_split(np.arange(n), segments):
            assert (
                stub.Insert(
                    pb.InsertParam(
                        collection_name=name, row_record_array=records(vectors[part]), row_id_array=ids[part].tolist()
                    )
                ).status.error_code
                == 0
            )
            assert stub.Flush(pb.FlushParam(collection_name_array=[name])).error_code == 0
    return vectors, ids


def test_pymilvus_0_2_14_client(cluster):
    vectors, ids = load(cluster.proxy.address, "for_0_2_14")
    with PymilvusClient(cluster.proxy.host, cluster.proxy.port, version="0.2.14") as client:
        assert client.call("client_version") == "0.2.14"
        status, result = client.search("for_0_2_14", 5, vectors[:3].tolist())
        assert status.OK(), status
        oracle.assert_same_result(result.ids, result.distances, oracle.brute_force(1, vectors[:3], vectors, ids, 5))
        assert client.count_entities("for_0_2_14")[1] == 300
        assert client.reload_segments("for_0_2_14", [1, 2]).OK()
        assert client.load_collection("for_0_2_14").OK()


def test_stacked_proxies(cluster, tmp_path):
    """A second Mishards whose read-only "node" is the first Mishards: SearchInFiles routes through it."""
    vectors, ids = load(cluster.proxy.address, "stacked")
    with (
        MishardsProcess(
            woserver=cluster.writable.address,
            meta_uri=cluster.meta_uri,
            ro_addresses=[cluster.proxy.address],
            log_dir=tmp_path,
        ) as outer,
        milvus_stub(outer.address) as stub,
    ):
        reply = stub.Search(search_param("stacked", vectors[:4], 7))
        assert reply.status.error_code == 0, reply.status
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, vectors[:4], vectors, ids, 7))


def test_changes_made_elsewhere_are_seen_after_the_ttl(cluster):
    with milvus_stub(cluster.proxy.address) as proxy:
        assert proxy.Search(search_param("made_elsewhere", np.zeros((1, 8), np.float32), 3)).status.error_code == 4
        vectors, ids = load(cluster.writable.address, "made_elsewhere")  # directly on the writable node
        time.sleep(1.2)  # SCHEMA_CACHE_TTL=1
        reply = proxy.Search(search_param("made_elsewhere", vectors[:2], 3))
        assert reply.status.error_code == 0, reply.status
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, vectors[:2], vectors, ids, 3))


def test_search_in_files_and_search_by_id_through_the_proxy(cluster):
    vectors, ids = load(cluster.proxy.address, "by_id", metric=2)
    import sqlalchemy as sa

    engine = sa.create_engine(cluster.meta_uri)
    with engine.connect() as conn:
        files = [
            str(r[0])
            for r in conn.execute(
                sa.text("SELECT id FROM TableFiles WHERE table_id = 'by_id' AND file_type = 1 ORDER BY id")
            )
        ]
    engine.dispose()
    part = np.array_split(np.arange(300), 4)
    with milvus_stub(cluster.proxy.address) as stub:
        reply = stub.SearchInFiles(
            pb.SearchInFilesParam(file_id_array=files[1:3], search_param=search_param("by_id", vectors[:2], 6))
        )
        chosen = np.concatenate(part[1:3])
        oracle.assert_same_result(
            *result_rows(reply), oracle.brute_force(2, vectors[:2], vectors[chosen], ids[chosen], 6)
        )
        reply = stub.SearchByID(pb.SearchByIDParam(collection_name="by_id", id_array=[int(ids[5]), 1], topk=4))
        assert reply.status.error_code == 0
        got_ids, _ = result_rows(reply)
        assert got_ids[0] == [i for i, _ in oracle.brute_force(2, vectors[5:6], vectors, ids, 4)[0]]
        assert got_ids[1] == [], "an unknown id gives an empty row"


def test_deletes_are_visible_through_read_only_nodes_at_once(cluster):
    vectors, ids = load(cluster.proxy.address, "deletes")
    with milvus_stub(cluster.proxy.address) as stub:
        assert stub.Search(search_param("deletes", vectors[:3], 5)).status.error_code == 0  # nodes cache the files
        doomed = [int(i) for i in ids[:3]]
        assert stub.DeleteByID(pb.DeleteByIDParam(collection_name="deletes", id_array=doomed)).error_code == 0
        assert stub.Flush(pb.FlushParam(collection_name_array=["deletes"])).error_code == 0
        reply = stub.Search(search_param("deletes", vectors[:3], 5))
        keep = ~np.isin(ids, doomed)
        oracle.assert_same_result(*result_rows(reply), oracle.brute_force(1, vectors[:3], vectors[keep], ids[keep], 5))

"""The Milvus numbers every part shares, pinned to the values Milvus 0.9.1 and pymilvus 0.2.12 use.

The rest of the suite reads them from utils.milvus_schema; this file writes them out once more, so a
wrong value there fails here rather than agreeing with itself everywhere else.
"""

from __future__ import annotations

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from utils import milvus_schema as schema
from utils.milvus_schema import FileType, IndexType, MetricType, TableState


def test_meta_db_values():
    assert (TableState.NORMAL, TableState.TO_DELETE) == (0, 1)
    assert [
        FileType.NEW,
        FileType.RAW,
        FileType.TO_INDEX,
        FileType.INDEX,
        FileType.TO_DELETE,
        FileType.NEW_MERGE,
        FileType.NEW_INDEX,
        FileType.BACKUP,
    ] == list(range(8))
    assert schema.SEARCHABLE_FILE_TYPES == (1, 2, 3)
    assert schema.IN_PROGRESS_FILE_TYPES == (0, 5, 6)
    assert schema.sql_list(schema.SEARCHABLE_FILE_TYPES) == "(1, 2, 3)"


def test_metric_types_and_their_direction():
    names = ["L2", "IP", "HAMMING", "JACCARD", "TANIMOTO", "SUBSTRUCTURE", "SUPERSTRUCTURE"]
    assert [getattr(MetricType, name) for name in names] == list(range(1, 8))
    assert schema.METRIC_TYPES == set(range(1, 8))
    assert schema.BINARY_METRICS == {3, 4, 5, 6, 7}
    assert schema.MATCH_FILTER_METRICS == {6, 7}
    assert [schema.is_descending(metric) for metric in range(1, 8)] == [False, True] + [False] * 5
    assert [schema.is_binary(metric) for metric in range(1, 8)] == [False, False] + [True] * 5


def test_index_types_and_engines():
    assert (IndexType.FLAT, IndexType.IVF_FLAT, IndexType.IVF_SQ8, IndexType.RNSG) == (1, 2, 3, 4)
    assert (IndexType.IVF_SQ8H, IndexType.IVF_PQ, IndexType.HNSW, IndexType.ANNOY) == (5, 6, 11, 12)
    assert (IndexType.BIN_FLAT, IndexType.BIN_IVF_FLAT) == (9, 10)
    assert schema.CLIENT_INDEX_TYPES == {1, 2, 3, 4, 5, 6, 11, 12}
    assert schema.BINARY_ENGINE == {1: 9, 2: 10} and schema.CLIENT_INDEX_TYPE == {9: 1, 10: 2}
    assert (schema.default_engine(MetricType.L2), schema.default_engine(MetricType.HAMMING)) == (1, 9)
    assert schema.INDEX_NAMES[1] == "IDMAP" and schema.INDEX_NAMES[4] == "NSG" and schema.INDEX_NAMES[12] == "ANNOY"


def test_service_and_method_tables():
    assert schema.SERVICE == "milvus.grpc.MilvusService"
    assert schema.method_path("Search") == "/milvus.grpc.MilvusService/Search"
    declared = [m.name for m in pb.DESCRIPTOR.services_by_name["MilvusService"].methods]
    assert set(schema.VECTOR_METHODS) <= set(declared), "every served method exists in the descriptor"
    assert len(schema.VECTOR_METHODS) == 26 and "ReloadSegments" in schema.VECTOR_METHODS
    assert set(schema.VECTOR_METHODS) | set(schema.HYBRID_METHODS) == set(declared)
    assert all("Hybrid" in name or "Entit" in name for name in schema.HYBRID_METHODS)
    assert schema.REPLY_CLASSES["Search"] is pb.TopKQueryResult
    assert schema.REQUEST_CLASSES["Search"] is pb.SearchParam
    assert "Flush" in schema.STATUS_REPLY_METHODS and "Search" not in schema.STATUS_REPLY_METHODS
    assert schema.REPLY_CLASSES["Flush"] is status_pb2.Status

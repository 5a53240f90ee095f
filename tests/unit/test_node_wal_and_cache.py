"""The write-ahead log's replay (torn and corrupt tails) and the segment cache's LRU bound."""

from __future__ import annotations

import numpy as np

from milvus_node import wal
from milvus_node.cache import SegmentCache
from milvus_node.storage import SegmentData


def test_replay_returns_records_in_order_across_rotations(tmp_path):
    log = wal.WriteAheadLog(str(tmp_path))
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert log.append(wal.INSERT, ["t"], np.array([1, 2, 3]), vectors) == 1
    covered = log.rotate()
    assert log.append(wal.DELETE, ["c"], np.array([2])) == 2
    log.append(wal.INSERT, ["b"], np.array([9]), np.array([[1, 255]], dtype=np.uint8))
    log.append(wal.DROP, ["t", "u"])
    log.close()
    records = list(wal.WriteAheadLog(str(tmp_path)).replay())
    assert [(r.lsn, r.kind, r.names) for r in records] == [
        (1, wal.INSERT, ["t"]),
        (2, wal.DELETE, ["c"]),
        (3, wal.INSERT, ["b"]),
        (4, wal.DROP, ["t", "u"]),
    ]
    np.testing.assert_array_equal(records[0].vectors, vectors)
    assert records[2].vectors.dtype == np.uint8 and records[2].vectors.tolist() == [[1, 255]]
    log = wal.WriteAheadLog(str(tmp_path))
    log.retire(covered)
    assert [r.lsn for r in log.replay()] == [2, 3, 4]


def test_torn_and_corrupt_tails_are_ignored(tmp_path):
    log = wal.WriteAheadLog(str(tmp_path))
    for i in range(3):
        log.append(wal.INSERT, ["t"], np.array([i]), np.ones((1, 4), dtype=np.float32))
    log.close()
    path = sorted(tmp_path.glob("*.wal"))[-1]
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the last record cut short
    assert [r.lsn for r in wal.WriteAheadLog(str(tmp_path)).replay()] == [1, 2]
    corrupt = bytearray(whole)
    corrupt[-3] ^= 0xFF  # a flipped byte in the last record's body
    path.write_bytes(bytes(corrupt))
    assert [r.lsn for r in wal.WriteAheadLog(str(tmp_path)).replay()] == [1, 2]
    path.write_bytes(whole + b"\x05")  # a header fragment
    assert [r.lsn for r in wal.WriteAheadLog(str(tmp_path)).replay()] == [1, 2, 3]


def segment(rows: int) -> SegmentData:
    return SegmentData(
        np.arange(rows, dtype=np.int64), np.zeros((rows, 4), dtype=np.float32), np.zeros(rows, dtype=bool)
    )


def test_cache_evicts_least_recently_used_within_its_capacity():
    one = segment(10).nbytes
    cache = SegmentCache(capacity_bytes=2 * one)
    cache.put(1, segment(10))
    cache.put(2, segment(10))
    assert cache.get(1, lambda: segment(10)) is not None  # 1 is now the most recent
    cache.put(3, segment(10))
    assert cache.peek(2) is None and cache.peek(1) is not None and cache.peek(3) is not None
    assert cache.used_bytes == 2 * one
    cache.resize(one)  # set_config cache_config.cpu_cache_capacity lowers the bound at once
    assert cache.used_bytes == one and cache.peek(1) is None and cache.peek(3) is not None

"""Segment files on the shared storage volume, in Milvus' 0.9 directory layout.

`<root>/db/tables/<table_id>/<segment_id>/` holds `<file_id>.rv` (raw vectors), `<file_id>.uid`
(int64 ids) and `deleted_docs` (int32 row offsets). Each file is an 8-byte little-endian byte
count followed by the bytes, as Milvus' codec writes them. A segment directory is written under a
temporary name, fsynced and renamed into place before its meta row exists, and `deleted_docs` is
replaced by rename: a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<Q")
DELETED_DOCS = "deleted_docs"


@dataclass
class SegmentData:
    """Loaded contents of one segment file: vectors, ids and which rows are deleted."""

    ids: np.ndarray  # int64, shape (n,)
    vectors: np.ndarray  # float32 (n, dim) or uint8 (n, dim/8)
    deleted: np.ndarray  # bool, shape (n,)
    norms: np.ndarray | None = None  # float32 squared norms of float vectors, for the L2 pre-selection
    index: object | None = None  # the segment's built index (milvus_node.index.LoadedIndex), if any

    def __post_init__(self) -> None:
        if self.norms is None and self.vectors.dtype == np.float32:
            self.norms = np.einsum("ij,ij->i", self.vectors, self.vectors)

    @property
    def nbytes(self) -> int:
        extra = (self.norms.nbytes if self.norms is not None else 0) + (
            self.index.nbytes if self.index is not None else 0
        )
        return int(self.ids.nbytes + self.vectors.nbytes + self.deleted.nbytes + extra)

    @property
    def live_count(self) -> int:
        return int(self.ids.size - np.count_nonzero(self.deleted))


def _write_blob(path: str, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(_HEADER.pack(len(payload)))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _read_blob(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise OSError(f"{path}: truncated header")
    (size,) = _HEADER.unpack_from(data)
    if len(data) - _HEADER.size != size:
        raise OSError(f"{path}: expected {size} bytes, found {len(data) - _HEADER.size}")
    return data[_HEADER.size :]


def fsync_dir(path: str) -> None:
    """Make a rename or new file in `path` durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentStore:
    """Reads and writes segment directories under `<root>/db/tables`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.tables_dir = os.path.join(root, "db", "tables")

    def segment_dir(self, table_id: str, segment_id: str) -> str:
        return os.path.join(self.tables_dir, table_id, segment_id)

    def write_segment(self, table_id: str, segment_id: str, file_id: str, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Write a new segment atomically; returns the raw data size in bytes."""
        table_dir = os.path.join(self.tables_dir, table_id)
        os.makedirs(table_dir, exist_ok=True)
        temp_dir = os.path.join(table_dir, f".tmp-{segment_id}-{uuid.uuid4().hex[:8]}")
        os.makedirs(temp_dir)
        try:
            raw = np.ascontiguousarray(vectors).tobytes()
            _write_blob(os.path.join(temp_dir, f"{file_id}.rv"), raw)
            _write_blob(os.path.join(temp_dir, f"{file_id}.uid"), np.ascontiguousarray(ids, dtype="<i8").tobytes())
            _write_blob(os.path.join(temp_dir, DELETED_DOCS), b"")
            fsync_dir(temp_dir)
            os.rename(temp_dir, self.segment_dir(table_id, segment_id))
            fsync_dir(table_dir)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return len(raw)

    def load_segment(self, table_id: str, segment_id: str, file_id: str, dimension: int, binary: bool) -> SegmentData:
        seg_dir = self.segment_dir(table_id, segment_id)
        ids = np.frombuffer(_read_blob(os.path.join(seg_dir, f"{file_id}.uid")), dtype="<i8").astype(np.int64)
        raw = _read_blob(os.path.join(seg_dir, f"{file_id}.rv"))
        if binary:
            vectors = np.frombuffer(raw, dtype=np.uint8).reshape(-1, dimension // 8)
        else:
            vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dimension)
        if vectors.shape[0] != ids.shape[0]:
            raise OSError(f"{seg_dir}: {vectors.shape[0]} vectors but {ids.shape[0]} ids")
        return SegmentData(ids, vectors, self.load_deleted(table_id, segment_id, ids.shape[0]))

    def load_deleted(self, table_id: str, segment_id: str, rows: int) -> np.ndarray:
        offsets = np.frombuffer(
            _read_blob(os.path.join(self.segment_dir(table_id, segment_id), DELETED_DOCS)), dtype="<i4"
        )
        deleted = np.zeros(rows, dtype=bool)
        deleted[offsets] = True
        return deleted

    def write_deleted(self, table_id: str, segment_id: str, deleted: np.ndarray) -> None:
        seg_dir = self.segment_dir(table_id, segment_id)
        temp = os.path.join(seg_dir, f"{DELETED_DOCS}.tmp")
        _write_blob(temp, np.flatnonzero(deleted).astype("<i4").tobytes())
        os.replace(temp, os.path.join(seg_dir, DELETED_DOCS))
        fsync_dir(seg_dir)

    def index_path(self, table_id: str, segment_id: str, file_id: str) -> str:
        """An index file lives beside its raw file: `<segment dir>/<index file_id>`."""
        return os.path.join(self.segment_dir(table_id, segment_id), file_id)

    def remove_index_file(self, table_id: str, segment_id: str, file_id: str) -> None:
        try:
            os.remove(self.index_path(table_id, segment_id, file_id))
        except FileNotFoundError:
            pass

    def remove_segment(self, table_id: str, segment_id: str) -> None:
        shutil.rmtree(self.segment_dir(table_id, segment_id), ignore_errors=True)
        table_dir = os.path.join(self.tables_dir, table_id)
        try:
            os.rmdir(table_dir)
        except OSError:
            pass

    def remove_orphan_segments(self, known: set[tuple[str, str]]) -> list[str]:
        """Drop segment dirs no meta row names: a crash between the rename and the meta insert
        leaves one (its rows are still in the WAL and get flushed again). Writers only, at start."""
        removed = []
        if not os.path.isdir(self.tables_dir):
            return removed
        for table_id in os.listdir(self.tables_dir):
            table_dir = os.path.join(self.tables_dir, table_id)
            for name in os.listdir(table_dir) if os.path.isdir(table_dir) else []:
                if not name.startswith(".tmp-") and (table_id, name) not in known:
                    shutil.rmtree(os.path.join(table_dir, name), ignore_errors=True)
                    removed.append(os.path.join(table_id, name))
        return removed

    def remove_stale_temp_dirs(self) -> None:
        """Drop half-written segment directories and files left by a crash (writers only)."""
        if not os.path.isdir(self.tables_dir):
            return
        for table_id in os.listdir(self.tables_dir):
            table_dir = os.path.join(self.tables_dir, table_id)
            for name in os.listdir(table_dir) if os.path.isdir(table_dir) else []:
                path = os.path.join(table_dir, name)
                if name.startswith(".tmp-"):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.isdir(path):
                    for leftover in os.listdir(path):
                        if ".tmp" in leftover:
                            os.remove(os.path.join(path, leftover))

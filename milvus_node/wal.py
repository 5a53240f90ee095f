"""Write-ahead log of inserts, deletes and drops, so an acknowledged write survives `kill -9`.

A record is appended and fsynced before the RPC answers. Records carry a global sequence number
(LSN); every segment file row stores the highest LSN it contains (`TableFiles.flush_lsn`), so
replay skips inserts that already reached a segment and applies a delete only to segments older
than it: replaying a log whose flush finished but was not yet retired changes nothing.
The log is a numbered series of files; a flush rotates to a new file and removes the files it
covered once their segments are committed. Record layout: `<length u32><crc32 u32>` then the
body `<lsn u64><kind u8><payload>`; a torn or corrupt tail (short read, bad checksum) ends the
replay of that file, since nothing after it was acknowledged.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .storage import fsync_dir

log = logging.getLogger(__name__)

INSERT, DELETE, DROP = 1, 2, 3
_FRAME = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<QB")
_SUFFIX = ".wal"


@dataclass(frozen=True)
class Record:
    lsn: int
    kind: int
    names: list[str]  # INSERT: [table_id]; DELETE: [collection]; DROP: the dropped table ids
    ids: np.ndarray | None = None
    vectors: np.ndarray | None = None


def _pack_strings(names: list[str]) -> bytes:
    encoded = [n.encode() for n in names]
    return struct.pack("<I", len(encoded)) + b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def _unpack_strings(data: memoryview, offset: int) -> tuple[list[str], int]:
    (count,) = struct.unpack_from("<I", data, offset)
    offset += 4
    names = []
    for _ in range(count):
        (size,) = struct.unpack_from("<I", data, offset)
        names.append(bytes(data[offset + 4 : offset + 4 + size]).decode())
        offset += 4 + size
    return names, offset


def _encode(record: Record) -> bytes:
    parts = [_BODY_HEAD.pack(record.lsn, record.kind), _pack_strings(record.names)]
    if record.ids is not None:
        parts.append(struct.pack("<Q", record.ids.size))
        parts.append(np.ascontiguousarray(record.ids, dtype="<i8").tobytes())
    if record.vectors is not None:
        binary = record.vectors.dtype == np.uint8
        parts.append(struct.pack("<BQ", binary, record.vectors.shape[1]))
        parts.append(np.ascontiguousarray(record.vectors).tobytes())
    body = b"".join(parts)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode(body: memoryview) -> Record:
    lsn, kind = _BODY_HEAD.unpack_from(body, 0)
    names, offset = _unpack_strings(body, _BODY_HEAD.size)
    ids = vectors = None
    if kind in (INSERT, DELETE):
        (count,) = struct.unpack_from("<Q", body, offset)
        offset += 8
        ids = np.frombuffer(body, dtype="<i8", count=count, offset=offset).astype(np.int64)
        offset += 8 * count
    if kind == INSERT:
        binary, width = struct.unpack_from("<BQ", body, offset)
        offset += 9
        dtype = np.uint8 if binary else np.dtype("<f4")
        vectors = (
            np.frombuffer(body, dtype=dtype, offset=offset)
            .reshape(-1, width)
            .astype(np.uint8 if binary else np.float32)
        )
    return Record(lsn, kind, names, ids, vectors)


class WriteAheadLog:
    """Appends (fsynced) and replays records under `<wal_dir>/<number>.wal`."""

    def __init__(self, wal_dir: str) -> None:
        self.dir = wal_dir
        os.makedirs(wal_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._file = None
        self._number = max(self._numbers(), default=0)
        self.last_lsn = 0

    def _numbers(self) -> list[int]:
        return sorted(
            int(name[: -len(_SUFFIX)])
            for name in os.listdir(self.dir)
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit()
        )

    def _path(self, number: int) -> str:
        return os.path.join(self.dir, f"{number:012d}{_SUFFIX}")

    def replay(self) -> Iterator[Record]:
        """Every intact record of every file, in order; a torn tail ends its file."""
        for number in self._numbers():
            path = self._path(number)
            with open(path, "rb") as f:
                data = memoryview(f.read())
            offset = 0
            while offset < len(data):
                if len(data) - offset < _FRAME.size:
                    log.warning("WAL %s: torn record header at byte %d ignored", path, offset)
                    break
                size, crc = _FRAME.unpack_from(data, offset)
                body = data[offset + _FRAME.size : offset + _FRAME.size + size]
                if len(body) != size or zlib.crc32(body) != crc:
                    log.warning("WAL %s: torn or corrupt record at byte %d ignored", path, offset)
                    break
                record = _decode(body)
                self.last_lsn = max(self.last_lsn, record.lsn)
                yield record
                offset += _FRAME.size + size

    def append(
        self, kind: int, names: list[str], ids: np.ndarray | None = None, vectors: np.ndarray | None = None
    ) -> int:
        """Write one record durably; returns its LSN. Callers serialize appends with buffer changes."""
        with self._lock:
            if self._file is None:
                self._number += 1
                self._file = open(self._path(self._number), "ab")
                fsync_dir(self.dir)
            self.last_lsn += 1
            self._file.write(_encode(Record(self.last_lsn, kind, names, ids, vectors)))
            self._file.flush()
            os.fsync(self._file.fileno())
            return self.last_lsn

    def rotate(self) -> list[int]:
        """Close the current file: later appends go to a new one. Returns the closed file numbers."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            return [n for n in self._numbers() if n <= self._number]

    def retire(self, numbers: list[int]) -> None:
        """Remove files whose records are all in committed segments."""
        for number in numbers:
            try:
                os.remove(self._path(number))
            except FileNotFoundError:
                pass
        fsync_dir(self.dir)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

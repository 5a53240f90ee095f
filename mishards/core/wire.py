"""Wire-level codecs for the search path that never decode or rebuild query vectors.

Touching vectors from Python is what costs (building a 100 x 768 request field by field takes
~20 ms), while the protobuf encoding lets the proxy avoid it (docs/protocol.md, "Byte-level facts"):

* ``SearchInFilesParam`` is field 1 (file ids) followed by field 2 holding a ``SearchParam``,
  so the client's ``SearchParam`` bytes are forwarded exactly as received;
* in ``TopKQueryResult``, ``distances`` is a packed float field -- the little-endian float32
  buffer as is -- and ``ids`` packed varints, encoded here by a vectorised varint encoder, so a
  merged reply is assembled from numpy buffers instead of Python values (~130 ns each);
* replies from nodes are parsed by upb and read into numpy through the buffer protocol.

Everything here produces what the generated ``milvus_pb2`` code would serialize, byte for byte.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from milvus_grpc import milvus_pb2, status_pb2
from utils.errors import UnexpectedError

# Tag bytes: (field number << 3) | wire type, 2 = length-delimited, 0 = varint.
_SEARCH_IN_FILES_FILE_ID = b"\x0a"  # SearchInFilesParam.file_id_array = 1
_SEARCH_IN_FILES_PARAM = b"\x12"  # SearchInFilesParam.search_param = 2
_TOPK_STATUS = b"\x0a"  # TopKQueryResult.status = 1
_TOPK_ROW_NUM = b"\x10"  # TopKQueryResult.row_num = 2 (varint)
_TOPK_IDS = b"\x1a"  # TopKQueryResult.ids = 3 (packed int64)
_TOPK_DISTANCES = b"\x22"  # TopKQueryResult.distances = 4 (packed float)

_GROUP_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)[:, None]  # a uint64 has at most 10 groups of 7 bits
_VARINT_CHUNK = 1 << 16  # values per pass: bounds the 80-bytes-per-value temporaries to ~5 MB
_SMALL_RESULT = 256  # ids up to which encode_topk_result uses the generated code (measured: 3 vs 14 us at 10)


def varint(value: int) -> bytes:
    """One non-negative integer as a protobuf varint (tags, lengths, row_num)."""
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def varints(values: np.ndarray) -> bytes:
    """int64 values as concatenated varints (a packed repeated int64 payload), vectorised.

    Negative values are their two's complement as uint64, so they take 10 bytes, as in protobuf.
    """
    unsigned = np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view(np.uint64)
    return b"".join(
        [_varint_chunk(unsigned[start : start + _VARINT_CHUNK]) for start in range(0, unsigned.size, _VARINT_CHUNK)]
    )


def _varint_chunk(unsigned: np.ndarray) -> bytes:
    """Varints of uint64 values through a (10 groups, values) byte matrix.

    Group g of a value is ``(value >> 7g) & 0x7F``; it is written when ``value >> 7g`` is non-zero
    (always for g = 0) and carries the continuation bit when the next group is written too. The
    matrix is built group-major (long, contiguous numpy loops), then transposed to value-major
    and compacted by the "written" mask -- faster than building it value-major (measured).
    """
    shifted = unsigned >> _GROUP_SHIFTS
    written = shifted != 0
    written[0] = True
    groups = shifted.astype(np.uint8)
    groups &= np.uint8(0x7F)
    groups[:-1] |= written[1:].view(np.uint8) << np.uint8(7)
    by_value = np.ascontiguousarray(groups.T).reshape(-1)
    return by_value[np.ascontiguousarray(written.T).reshape(-1)].tobytes()


def _length_delimited(tag: bytes, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """A length-delimited field as pieces, so a message is joined once, without copying payloads twice."""
    return tag, varint(len(payload)), payload


def search_in_files_request(file_ids: list[str], search_param_bytes: bytes) -> bytes:
    """A serialized ``SearchInFilesParam`` around the client's ``SearchParam`` bytes, unchanged."""
    pieces = [piece for file_id in file_ids for piece in _length_delimited(_SEARCH_IN_FILES_FILE_ID, file_id.encode())]
    pieces += _length_delimited(_SEARCH_IN_FILES_PARAM, search_param_bytes)
    return b"".join(pieces)


def encode_topk_result(ids: np.ndarray, distances: np.ndarray, status: status_pb2.Status | None = None) -> bytes:
    """A serialized ``TopKQueryResult`` from (nq, k) arrays; ``row_num`` is nq.

    `status` None leaves the field out (clients read an absent status as SUCCESS); an error reply
    passes its status with (0, 0) arrays, giving ``row_num = 0`` and empty lists.
    """
    ids = np.asarray(ids)
    distances = np.asarray(distances)
    if ids.ndim != 2 or ids.shape != distances.shape:
        raise ValueError(f"ids {ids.shape} and distances {distances.shape} must be equal (nq, k) shapes")
    if ids.size <= _SMALL_RESULT:  # a few values: the generated code is cheaper than numpy's set-up
        reply = milvus_pb2.TopKQueryResult(
            row_num=ids.shape[0], ids=ids.ravel().tolist(), distances=distances.ravel().tolist()
        )
        if status is not None:
            reply.status.CopyFrom(status)
        return reply.SerializeToString()
    pieces: list[bytes] = []
    if status is not None:
        pieces += _length_delimited(_TOPK_STATUS, status.SerializeToString())
    if ids.shape[0]:
        pieces += (_TOPK_ROW_NUM, varint(ids.shape[0]))
    if ids.size:
        pieces += _length_delimited(_TOPK_IDS, varints(ids))
        pieces += _length_delimited(_TOPK_DISTANCES, distances.astype("<f4", copy=False).tobytes())
    return b"".join(pieces)


class TopKReply(NamedTuple):
    """A decoded ``TopKQueryResult``: ids (int64) and distances (float32) shaped (row_num, k)."""

    status_code: int
    reason: str
    row_num: int
    ids: np.ndarray
    distances: np.ndarray


def decode_topk_result(data: bytes) -> TopKReply:
    """Parse a node's ``TopKQueryResult``, checking the invariants pymilvus also checks.

    On an error status the arrays are empty (0, 0): clients ignore them. A reply whose ids and
    distances differ in length, or do not fill ``row_num`` equal rows, raises UnexpectedError.
    """
    reply = milvus_pb2.TopKQueryResult.FromString(data)
    code, reason, row_num = reply.status.error_code, reply.status.reason, reply.row_num
    if code != status_pb2.SUCCESS:
        return TopKReply(code, reason, row_num, np.empty((0, 0), np.int64), np.empty((0, 0), np.float32))
    # np.array reads upb's repeated fields through the buffer protocol: ~5 us per 10k values,
    # ~100x faster than iterating them.
    ids = np.array(reply.ids, dtype=np.int64)
    distances = np.array(reply.distances, dtype=np.float32)
    if ids.size != distances.size:
        raise UnexpectedError(f"malformed search result: {ids.size} ids but {distances.size} distances")
    if row_num == 0:
        if ids.size:
            raise UnexpectedError(f"malformed search result: {ids.size} ids but row_num 0")
        return TopKReply(code, reason, 0, ids.reshape(0, 0), distances.reshape(0, 0))
    if row_num < 0 or ids.size % row_num:
        raise UnexpectedError(f"malformed search result: {ids.size} ids do not fill {row_num} equal rows")
    width = ids.size // row_num
    return TopKReply(code, reason, row_num, ids.reshape(row_num, width), distances.reshape(row_num, width))

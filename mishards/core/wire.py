"""Wire-level codecs for the search path that never decode or rebuild query vectors.

Touching vectors from Python is what costs (building a 100 x 768 request field by field takes
~20 ms), while the protobuf encoding lets the proxy avoid it (docs/protocol.md, "Byte-level facts"):

* ``SearchInFilesParam`` is field 1 (file ids) followed by field 2 holding a ``SearchParam``,
  so the client's ``SearchParam`` bytes are forwarded exactly as received;
* in ``TopKQueryResult``, ``distances`` is a packed float field -- the little-endian float32
  buffer as is -- and ``ids`` packed varints, encoded here by a vectorised varint encoder, so a
  merged reply is assembled from numpy buffers instead of Python values (~130 ns each);
* a node's reply is read in place: the packed distances are viewed as float32 where they lie in
  the message, and only the ids are taken from upb (which decodes varints faster than numpy
  can); small replies become Python lists for the merge's pure-Python path. Anything not encoded
  the canonical way (unpacked or split repeated fields, unknown fields) is parsed by protobuf.

Everything here produces what the generated ``milvus_pb2`` code would serialize, byte for byte.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from milvus_grpc import milvus_pb2, status_pb2
from mishards.core.compiled import kernels as _kernels
from utils.errors import UnexpectedError

# Tag bytes: (field number << 3) | wire type, 2 = length-delimited, 0 = varint.
_SEARCH_IN_FILES_FILE_ID = b"\x0a"  # SearchInFilesParam.file_id_array = 1
_SEARCH_IN_FILES_PARAM = b"\x12"  # SearchInFilesParam.search_param = 2
_TOPK_STATUS = b"\x0a"  # TopKQueryResult.status = 1
_TOPK_ROW_NUM = b"\x10"  # TopKQueryResult.row_num = 2 (varint)
_TOPK_IDS = b"\x1a"  # TopKQueryResult.ids = 3 (packed int64)
_TOPK_DISTANCES = b"\x22"  # TopKQueryResult.distances = 4 (packed float)

_CHUNK = 1 << 16  # values per encoding pass: bounds the temporaries (~30 bytes per value) to ~2 MB
_SMALL_RESULT = 256  # ids up to which encode_topk_result uses the generated code (measured: 3 vs 14 us at 10)
SMALL_REPLY_BYTES = 1024
"""Node replies up to this size decode to Python lists for the merge (decode_topk_hits): at a few
dozen values, numpy's per-call costs exceed the whole pure-Python merge."""

_GROUP_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)[:, None]  # a uint64 has at most 10 groups of 7 bits


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
    return b"".join([_varint_chunk(unsigned[start : start + _CHUNK]) for start in range(0, unsigned.size, _CHUNK)])


def _varint_chunk(unsigned: np.ndarray) -> bytes:
    """Varints of uint64 values through a (groups, values) byte matrix.

    Group g of a value is ``(value >> 7g) & 0x7F``; it is written when ``value >> 7g`` is non-zero
    (always for g = 0) and carries the continuation bit when the next group is written too. The
    matrix is built group-major (long, contiguous numpy loops), then transposed to value-major
    and compacted by the "written" mask -- faster than building it value-major (measured). It
    has only as many groups as the largest value needs: ids below 2**21 cost 3 rows, not 10.
    (Building each value's bytes in one uint64 and storing them at their offsets measured
    slower: numpy's unaligned or per-column scatters cost more than these passes.)
    """
    if unsigned.size == 0:
        return b""
    largest = int(unsigned.max())
    if largest < 1 << 28:
        return _spread_varints(unsigned.astype(np.uint32), _SPREAD_32, int(unsigned.min()) >= 1 << 21)
    if largest < 1 << 56:
        return _spread_varints(unsigned.copy(), _SPREAD_64, int(unsigned.min()) >= 1 << 49)
    groups = max(1, -(-largest.bit_length() // 7))
    shifted = unsigned >> _GROUP_SHIFTS[:groups]
    written = shifted != 0
    written[0] = True
    bytes_ = shifted.astype(np.uint8)
    bytes_ &= np.uint8(0x7F)
    bytes_[:-1] |= written[1:].view(np.uint8) << np.uint8(7)
    by_value = np.ascontiguousarray(bytes_.T).reshape(-1)
    return by_value[np.ascontiguousarray(written.T).reshape(-1)].tobytes()


def _spread_varints(words: np.ndarray, steps: _SpreadSteps, every_byte: bool) -> bytes:
    """Varints of values that fit one word's 7-bit groups (below 2**28 in a uint32, 2**56 in a
    uint64), each value spread in place to one byte per group, as a bit-deposit instruction would.

    The spread takes one shift-and-mask step per halving of the lane width. A value's bytes
    beyond its highest non-zero group are zero, so OR-ing each word with itself shifted down by
    1, 2, 4 bytes marks the bytes below its top one; adding 0x7F per byte turns each marked byte
    into 0x80 (groups are at most 0x7F: no carry crosses a byte). That gives both the
    continuation bits and which bytes to keep, and one 1-D compaction of the words' bytes is the
    payload. Only whole-array operations on one word per value, no (values, groups) matrix: at
    10k ids 2-3x cheaper than the matrix (measured). `every_byte`: each value fills its word (its
    smallest needs all the groups), so there is nothing to mark or compact.
    """
    dtype = words.dtype.type
    for shift, high, low in steps.spread:  # e.g. 28-bit halves to 32-bit lanes, 14 to 16, 7 to 8
        moved = words << shift
        moved &= high
        words &= low
        words |= moved
    if every_byte:
        words |= steps.high_bits >> dtype(8)
        return words.tobytes()
    marks = words >> dtype(8)
    marks |= words
    for shift in steps.fill:
        marks |= marks >> shift
    marks += steps.seven_f
    marks &= steps.high_bits  # 0x80 in every byte up to the value's top one
    words |= marks >> dtype(8)  # continuation bits: every kept byte but the last
    marks >>= dtype(7)
    marks |= dtype(1)  # 0x01 in every kept byte: a bool mask over the bytes
    keep = marks.view(np.bool_)
    if steps is _SPREAD_32:  # 1-4 bytes each, no pattern: np.compress is ~3x cheaper (measured)
        return np.compress(keep, words.view(np.uint8)).tobytes()
    return words.view(np.uint8)[keep].tobytes()  # mostly whole words: boolean indexing is ~2x cheaper


class _SpreadSteps(NamedTuple):
    spread: list[tuple[Any, Any, Any]]  # (shift, where the high half goes, the low half kept)
    fill: list[Any]
    seven_f: Any
    high_bits: Any


_SPREAD_32 = _SpreadSteps(
    [
        (np.uint32(shift), np.uint32(high), np.uint32(low))
        for shift, high, low in ((2, 0x3FFF_0000, 0x3FFF), (1, 0x7F00_7F00, 0x007F_007F))
    ],
    [np.uint32(16)],
    np.uint32(0x7F7F_7F7F),
    np.uint32(0x8080_8080),
)
_SPREAD_64 = _SpreadSteps(
    [
        (np.uint64(shift), np.uint64(high), np.uint64(low))
        for shift, high, low in (
            (4, 0x0FFF_FFFF_0000_0000, 0x0FFF_FFFF),
            (2, 0x3FFF_0000_3FFF_0000, 0x0000_3FFF_0000_3FFF),
            (1, 0x7F00_7F00_7F00_7F00, 0x007F_007F_007F_007F),
        )
    ],
    [np.uint64(16), np.uint64(32)],
    np.uint64(0x7F7F_7F7F_7F7F_7F7F),
    np.uint64(0x8080_8080_8080_8080),
)


def _length_delimited(tag: bytes, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """A length-delimited field as pieces, so a message is joined once, without copying payloads twice."""
    return tag, varint(len(payload)), payload


def search_in_files_request(file_ids: list[str], search_param_bytes: bytes) -> bytes:
    """A serialized ``SearchInFilesParam`` around the client's ``SearchParam`` bytes, unchanged."""
    pieces = [piece for file_id in file_ids for piece in _length_delimited(_SEARCH_IN_FILES_FILE_ID, file_id.encode())]
    pieces += _length_delimited(_SEARCH_IN_FILES_PARAM, search_param_bytes)
    return b"".join(pieces)


def encode_topk_result(
    ids: np.ndarray | list[int],
    distances: np.ndarray | list[float],
    status: status_pb2.Status | None = None,
    rows: int | None = None,
) -> bytes:
    """A serialized ``TopKQueryResult`` from (nq, k) arrays; ``row_num`` is nq.

    `ids` and `distances` may also be flat row-major lists (what the merge returns for lists),
    then `rows` is nq; empty lists mean no rows. `status` None leaves the field out (clients read
    an absent status as SUCCESS); an error reply passes its status with (0, 0) arrays, giving
    ``row_num = 0`` and empty lists.
    """
    if isinstance(ids, list):
        if rows is None or len(ids) != len(distances) or (ids and (rows < 1 or len(ids) % rows)):
            raise ValueError(f"{len(ids)} ids and {len(distances)} distances are not {rows} equal rows")
        reply = milvus_pb2.TopKQueryResult(row_num=rows if ids else 0, ids=ids, distances=distances)
        if status is not None:
            reply.status.CopyFrom(status)
        return reply.SerializeToString()
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
    """A decoded ``TopKQueryResult``: ids (int64) and distances (float32) shaped (row_num, k).

    From decode_topk_hits, small replies carry flat row-major Python lists instead.
    """

    status_code: int
    reason: str
    row_num: int
    ids: np.ndarray | list[int]
    distances: np.ndarray | list[float]


_TOPK_FROM_STRING = milvus_pb2.TopKQueryResult.FromString
_new_tuple = tuple.__new__


class _TopKFields(NamedTuple):
    """Where the fields of a canonically encoded ``TopKQueryResult`` are (slices of the message)."""

    status: slice | None
    row_num: int
    ids: slice | None  # the packed payload only
    distances: slice | None  # the packed payload only


_TOPK_TAGS = {0x0A: 1, 0x10: 2, 0x1A: 4, 0x22: 8}  # status, row_num, packed ids, packed distances -> seen bit


def _read_varint(data: bytes, position: int) -> tuple[int, int] | None:
    """The varint at `position` and the position after it; None past the end or beyond 64 bits."""
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, index + 1) if value < 1 << 64 else None
        shift += 7
    return None


def _topk_fields(data: bytes) -> _TopKFields | None:
    """The fields of a ``TopKQueryResult`` as our nodes and Milvus encode it: each of the four
    fields at most once, ids and distances packed, nothing else. None for anything else (unpacked
    or split repeated fields, unknown fields, truncation): protobuf parses those. At most four
    loop turns: a fifth field repeats one."""
    status = ids = distances = None
    row_num = seen = position = 0
    while position < len(data):
        tag = data[position]
        bit = _TOPK_TAGS.get(tag, 0)
        if not bit or seen & bit:
            return None
        seen |= bit
        read = _read_varint(data, position + 1)
        if read is None:
            return None
        value, start = read
        if tag == 0x10:
            row_num, position = (value - (1 << 64) if value >> 63 else value), start
            continue
        end = start + value
        if end > len(data):
            return None
        if tag == 0x0A:
            status = slice(start, end)
        elif tag == 0x1A:
            ids = slice(start, end)
        else:
            distances = slice(start, end)
        position = end
    return _TopKFields(status, row_num, ids, distances)


def _parse(message_type, data: bytes):
    """protobuf's parse; a malformed message is the node's fault, not the client's request."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise UnexpectedError(f"malformed search result: {exc}") from exc


def decode_topk_result(data: bytes) -> TopKReply:
    """Parse a node's ``TopKQueryResult``, checking the invariants pymilvus also checks.

    On an error status the arrays are empty (0, 0): clients ignore them. A reply whose ids and
    distances differ in length, or do not fill ``row_num`` equal rows, raises UnexpectedError.

    Canonical messages are read in place: the distances are the packed float32 payload itself (a
    read-only view, no copy) and the ids are decoded by the compiled varint decoder (without it,
    taken from upb, which decodes varints faster than numpy can: a numpy decoder reading one word
    per varint measured no faster). Anything else is parsed by protobuf whole.
    """
    fields = _topk_fields(data)
    if fields is None:
        reply = _parse(milvus_pb2.TopKQueryResult, data)
        code, reason, row_num = reply.status.error_code, reply.status.reason, reply.row_num
        if code != status_pb2.SUCCESS:
            return _error_reply(code, reason, row_num)
        # np.array reads upb's repeated fields in C, ~100x faster than iterating them
        ids = np.array(reply.ids, dtype=np.int64)
        distances = np.array(reply.distances, dtype=np.float32)
    else:
        code, reason = _status(data, fields.status)
        if code != status_pb2.SUCCESS:
            return _error_reply(code, reason, fields.row_num)
        row_num = fields.row_num
        if fields.ids is None:
            ids = np.empty(0, np.int64)
        elif _kernels is not None:  # the compiled decoder: ~3x cheaper than upb plus np.array (10k ids)
            ids = np.empty(fields.ids.stop - fields.ids.start, np.int64)
            try:
                ids = ids[: _kernels.decode_varints(data, fields.ids.start, fields.ids.stop, ids)]
            except ValueError as exc:
                raise UnexpectedError(f"malformed search result: {exc}") from None
        else:
            # upb decodes the ids; from the whole message, not a copy of the ids field: ~20%
            # cheaper at 10k ids (measured), though it also reads the distances it does not keep
            ids = np.array(_parse(milvus_pb2.TopKQueryResult, data).ids, dtype=np.int64)
        distances = _packed_floats(data, fields.distances)
    width = _row_width(row_num, len(ids), len(distances))
    if row_num == 0:
        return TopKReply(code, reason, 0, ids.reshape(0, 0), distances.reshape(0, 0))
    return TopKReply(code, reason, row_num, ids.reshape(row_num, width), distances.reshape(row_num, width))


def decode_topk_hits(data: bytes) -> TopKReply:
    """decode_topk_result for the merge: replies up to SMALL_REPLY_BYTES come as flat row-major
    Python lists, which the merge's pure-Python path takes without conversions. (Written for
    speed: at one query this is a third of the proxy's search path.)"""
    if len(data) > SMALL_REPLY_BYTES:
        return decode_topk_result(data)
    try:
        reply = _TOPK_FROM_STRING(data)
    except DecodeError as exc:
        raise UnexpectedError(f"malformed search result: {exc}") from exc
    status = reply.status
    code = status.error_code
    if code:
        return TopKReply(code, status.reason, reply.row_num, [], [])
    ids, distances, row_num = reply.ids[:], reply.distances[:], reply.row_num  # slices: lists, ~2x cheaper than list()
    if len(ids) != len(distances) or (row_num > 0 and len(ids) % row_num) or (row_num <= 0 and (ids or row_num)):
        _row_width(row_num, len(ids), len(distances))  # raises, saying what is wrong
    return _new_tuple(TopKReply, (0, status.reason, row_num, ids, distances))  # TopKReply(...) costs ~0.6 us more


def _status(data: bytes, field: slice | None) -> tuple[int, str]:
    if field is None or field.start == field.stop:
        return status_pb2.SUCCESS, ""
    status = _parse(status_pb2.Status, data[field])
    return status.error_code, status.reason


def _packed_floats(data: bytes, field: slice | None) -> np.ndarray:
    """The float32 values of a packed field, viewing the message's bytes."""
    if field is None:
        return np.empty(0, np.float32)
    if (field.stop - field.start) % 4:
        raise UnexpectedError(f"malformed search result: {field.stop - field.start} bytes of packed floats")
    return np.frombuffer(data, dtype="<f4", count=(field.stop - field.start) // 4, offset=field.start)


def _error_reply(code: int, reason: str, row_num: int) -> TopKReply:
    return TopKReply(code, reason, row_num, np.empty((0, 0), np.int64), np.empty((0, 0), np.float32))


def _row_width(row_num: int, id_count: int, distance_count: int) -> int:
    """The per-row width k, after the checks pymilvus makes; raises UnexpectedError on a mismatch."""
    if id_count != distance_count:
        raise UnexpectedError(f"malformed search result: {id_count} ids but {distance_count} distances")
    if row_num == 0:
        if id_count:
            raise UnexpectedError(f"malformed search result: {id_count} ids but row_num 0")
        return 0
    if row_num < 0 or id_count % row_num:
        raise UnexpectedError(f"malformed search result: {id_count} ids do not fill {row_num} equal rows")
    return id_count // row_num

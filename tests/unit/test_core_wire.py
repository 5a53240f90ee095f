"""Wire helpers against the generated milvus_pb2 code: byte-identical output, lossless round trips."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milvus_grpc import milvus_pb2, status_pb2
from mishards.core import wire
from utils.errors import UnexpectedError


@pytest.fixture(autouse=True, params=["compiled", "upb"])
def varint_decoder(request):
    """Every test runs with the compiled varint decoder (skipped where it was not built) and with
    upb, which decodes the ids without it."""
    if request.param == "compiled":
        if wire._kernels is None:
            pytest.skip("the compiled kernels (mishards/core/_topk.c) were not built")
        yield request.param
        return
    with mock.patch.object(wire, "_kernels", None):
        yield request.param


INT64 = st.integers(-(2**63), 2**63 - 1)
int64_values = st.one_of(st.just(-1), st.integers(0, 2**63 - 1), INT64, st.integers(0, 300))


@st.composite
def search_params(draw) -> milvus_pb2.SearchParam:
    binary = draw(st.booleans())
    nq = draw(st.integers(0, 4))
    if binary:
        records = [milvus_pb2.RowRecord(binary_data=draw(st.binary(max_size=16))) for _ in range(nq)]
    else:
        vector = st.lists(st.floats(width=32, allow_nan=False), max_size=8)
        records = [milvus_pb2.RowRecord(float_data=draw(vector)) for _ in range(nq)]
    return milvus_pb2.SearchParam(
        collection_name=draw(st.text(max_size=20)),
        partition_tag_array=draw(st.lists(st.text(max_size=10), max_size=3)),
        query_record_array=records,
        topk=draw(st.integers(0, 2048)),
        extra_params=[
            milvus_pb2.KeyValuePair(key=key, value=value)
            for key, value in draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=2))
        ],
    )


@st.composite
def result_arrays(draw, finite=True):
    nq, k = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    if nq == 0:
        k = 0
    ids = np.array(draw(st.lists(int64_values, min_size=nq * k, max_size=nq * k)), np.int64).reshape(nq, k)
    distances = draw(st.lists(st.floats(width=32, allow_nan=not finite), min_size=nq * k, max_size=nq * k))
    return ids, np.array(distances, np.float32).reshape(nq, k)


file_id_lists = st.lists(st.one_of(st.integers(0, 10**15).map(str), st.text(max_size=6)), max_size=20)


@settings(max_examples=100, deadline=None)
@given(param=search_params(), file_ids=file_id_lists)
def test_search_in_files_is_byte_identical_to_the_generated_code(param, file_ids):
    param_bytes = param.SerializeToString()

    request = wire.search_in_files_request(file_ids, param_bytes)

    expected = milvus_pb2.SearchInFilesParam(file_id_array=file_ids, search_param=param)
    assert request == expected.SerializeToString()
    assert milvus_pb2.SearchInFilesParam.FromString(request) == expected


def test_search_in_files_forwards_the_search_param_bytes_verbatim():
    """Non-canonical client bytes (fields in reverse order) are carried as they are, not re-encoded."""
    topk_field, name_field = b"\x20\x0a", b"\x0a\x03abc"
    client_bytes = topk_field + name_field

    request = wire.search_in_files_request(["12", "7"], client_bytes)

    assert request.endswith(b"\x12" + bytes([len(client_bytes)]) + client_bytes)
    parsed = milvus_pb2.SearchInFilesParam.FromString(request)
    assert list(parsed.file_id_array) == ["12", "7"]
    assert parsed.search_param == milvus_pb2.SearchParam(collection_name="abc", topk=10)


@pytest.mark.parametrize("small_result", [-1, wire._SMALL_RESULT], ids=["numpy path", "default"])
@settings(max_examples=150, deadline=None)
@given(arrays=result_arrays(), with_status=st.booleans())
def test_topk_result_is_byte_identical_to_the_generated_code(small_result, arrays, with_status):
    ids, distances = arrays
    status = status_pb2.Status() if with_status else None

    with mock.patch.object(wire, "_SMALL_RESULT", small_result):
        encoded = wire.encode_topk_result(ids, distances, status)

    expected = milvus_pb2.TopKQueryResult(
        row_num=ids.shape[0], ids=ids.ravel().tolist(), distances=distances.ravel().tolist()
    )
    if with_status:
        expected.status.CopyFrom(status_pb2.Status())
        assert encoded.startswith(b"\x0a\x00")
    assert encoded == expected.SerializeToString()


@settings(max_examples=100, deadline=None)
@given(arrays=result_arrays(finite=False))
def test_topk_result_round_trips_through_decode(arrays):
    ids, distances = arrays

    reply = wire.decode_topk_result(wire.encode_topk_result(ids, distances))

    assert (reply.status_code, reply.reason, reply.row_num) == (0, "", ids.shape[0])
    expected_shape = ids.shape if ids.size else (ids.shape[0], 0) if ids.shape[0] else (0, 0)
    assert reply.ids.shape == reply.distances.shape == expected_shape
    np.testing.assert_array_equal(reply.ids.reshape(-1), ids.reshape(-1))
    assert reply.distances.tobytes() == distances.tobytes()  # bit-exact, NaN payloads included


@pytest.mark.parametrize(
    "value",
    [0, 1, 127, 128, 255, 16383, 16384, 2**35 - 1, 2**35, 2**56 - 1, 2**56, 2**62, 2**63 - 1, -1, -2, -(2**63)],
)
def test_varints_at_every_width_boundary_match_protobuf(value):
    encoded = wire.varints(np.array([value, 5, value]))
    reference = milvus_pb2.TopKQueryResult(ids=[value, 5, value]).SerializeToString()

    assert reference == b"\x1a" + wire.varint(len(encoded)) + encoded
    if value < 0:
        assert len(encoded) == 10 + 1 + 10


VARINT_RANGES = {  # (low, high): each selects one encoder path (one word per value, or the matrix)
    "below 2**28 (uint32 words)": (0, 2**28),
    "2**21 up to 2**28 (uint32 words, every byte kept)": (2**21, 2**28),
    "below 2**56 (uint64 words)": (0, 2**56),
    "2**49 up to 2**56 (uint64 words, every byte kept)": (2**49, 2**56),
    "small and large (the group matrix)": (0, 2**63),
}


@pytest.mark.parametrize("value_range", VARINT_RANGES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_varints_on_every_encoder_path_match_protobuf(value_range, data):
    low, high = VARINT_RANGES[value_range]
    edges = [v for edge in (7, 14, 21, 28, 35, 42, 49, 56) for v in (2**edge - 1, 2**edge) if low <= v < high]
    values = data.draw(st.lists(st.one_of(st.integers(low, high - 1), st.sampled_from(edges or [low])), max_size=80))

    encoded = wire.varints(np.array(values, np.int64))

    assert b"\x1a" + wire.varint(len(encoded)) + encoded == milvus_pb2.TopKQueryResult(
        ids=values
    ).SerializeToString() or (not values and encoded == b"")


def test_results_larger_than_one_encoding_chunk():
    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 2**62, (300, 300))
    distances = rng.standard_normal((300, 300)).astype(np.float32)

    expected = milvus_pb2.TopKQueryResult(row_num=300, ids=ids.ravel().tolist(), distances=distances.ravel().tolist())
    assert wire.encode_topk_result(ids, distances) == expected.SerializeToString()


def test_an_error_reply_carries_the_status_and_nothing_else():
    status = status_pb2.Status(error_code=status_pb2.COLLECTION_NOT_EXISTS, reason="Collection x does not exist.")

    encoded = wire.encode_topk_result(np.empty((0, 0), np.int64), np.empty((0, 0), np.float32), status)

    assert encoded == milvus_pb2.TopKQueryResult(status=status).SerializeToString()
    reply = wire.decode_topk_result(encoded)
    assert (reply.status_code, reply.reason, reply.row_num) == (4, "Collection x does not exist.", 0)
    assert reply.ids.shape == reply.distances.shape == (0, 0)


def test_an_empty_success_decodes_to_no_rows():
    reply = wire.decode_topk_result(b"")
    assert (reply.status_code, reply.row_num, reply.ids.shape) == (0, 0, (0, 0))


@pytest.mark.parametrize(
    "reply",
    [
        milvus_pb2.TopKQueryResult(row_num=1, ids=[1, 2], distances=[0.5]),
        milvus_pb2.TopKQueryResult(row_num=2, ids=[1, 2, 3], distances=[0.1, 0.2, 0.3]),
        milvus_pb2.TopKQueryResult(row_num=0, ids=[1], distances=[0.1]),
        milvus_pb2.TopKQueryResult(row_num=-1, ids=[1], distances=[0.1]),
    ],
    ids=["lengths differ", "rows uneven", "hits without rows", "negative rows"],
)
def test_malformed_node_replies_are_refused(reply):
    with pytest.raises(UnexpectedError):
        wire.decode_topk_result(reply.SerializeToString())


def test_scalar_varint_matches_protobuf():
    assert wire.varint(0) == b"\x00"
    for value in (1, 127, 128, 300, 2**32, 2**63 - 1):  # proto3 leaves a zero row_num out
        assert milvus_pb2.TopKQueryResult(row_num=value).SerializeToString() == b"\x10" + wire.varint(value)


def test_encoding_refuses_arrays_that_are_not_one_nq_by_k_block():
    with pytest.raises(ValueError):
        wire.encode_topk_result(np.zeros((2, 3), np.int64), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        wire.encode_topk_result(np.zeros(6, np.int64), np.zeros(6, np.float32))


def _protobuf_view(data: bytes):
    """What the generated code reads from `data`: (code, reason, row_num, ids, distances)."""
    reply = milvus_pb2.TopKQueryResult.FromString(data)
    return reply.status.error_code, reply.status.reason, reply.row_num, list(reply.ids), list(reply.distances)


def _unpacked(tag_number: int, wire_type: int, payloads: list[bytes]) -> bytes:
    return b"".join(wire.varint(tag_number << 3 | wire_type) + payload for payload in payloads)


@st.composite
def topk_messages(draw):
    """TopKQueryResult bytes as any protobuf writer may emit them: fields in any order, packed or
    not, split packed runs, unknown fields, a repeated row_num, error statuses."""
    ids, distances = draw(result_arrays(finite=False))
    nq = ids.shape[0]
    flat_ids = ids.ravel().tolist()
    fields = []
    if draw(st.booleans()):
        code = draw(st.sampled_from([0, 0, 1, 4, 20]))
        fields.append(
            b"\x0a"
            + wire.varint(
                len(s := status_pb2.Status(error_code=code, reason=draw(st.text(max_size=8))).SerializeToString())
            )
            + s
        )
    if nq:
        if draw(st.booleans()):  # an earlier row_num the later one overrides
            fields.append(b"\x10" + wire.varint(draw(st.integers(0, 300))))
        fields.append(b"\x10" + wire.varint(nq))
    packing = draw(st.sampled_from(["packed", "unpacked", "split"]))
    if flat_ids:
        if packing == "packed":
            fields.append(b"\x1a" + wire.varint(len(v := wire.varints(np.array(flat_ids)))) + v)
            fields.append(b"\x22" + wire.varint(len(f := distances.astype("<f4").tobytes())) + f)
        elif packing == "unpacked":
            fields.append(_unpacked(3, 0, [wire.varint(i % 2**64) for i in flat_ids]))
            fields.append(_unpacked(4, 5, [np.float32(d).astype("<f4").tobytes() for d in distances.ravel()]))
        else:
            half = len(flat_ids) // 2
            for part in (slice(0, half), slice(half, None)):
                v = wire.varints(np.array(flat_ids[part], np.int64))
                f = distances.ravel()[part].astype("<f4").tobytes()
                fields.append(b"\x1a" + wire.varint(len(v)) + v + b"\x22" + wire.varint(len(f)) + f)
    if draw(st.booleans()):  # unknown fields: a varint and a length-delimited one
        fields.append(b"\x28\x07" + b"\x3a\x02ab")
    order = draw(st.permutations(range(len(fields))))
    return b"".join(fields[i] for i in order)


@settings(max_examples=200, deadline=None)
@given(data=topk_messages())
def test_decoding_reads_what_protobuf_reads(data):
    """The in-place reader and its protobuf fallback give what the generated code parses."""
    code, reason, row_num, ids, distances = _protobuf_view(data)
    for decode in (wire.decode_topk_result, wire.decode_topk_hits):
        try:
            reply = decode(data)
        except UnexpectedError:
            assert code == 0 and (
                len(ids) != len(distances) or (row_num and len(ids) % row_num) or row_num < 0 or (row_num == 0 and ids)
            )
            continue
        assert (reply.status_code, reply.reason, reply.row_num) == (code, reason, row_num)
        if code:
            assert len(reply.ids) == len(reply.distances) == 0
            continue
        assert np.asarray(reply.ids).ravel().tolist() == ids
        assert np.asarray(reply.distances, np.float32).tobytes() == np.array(distances, np.float32).tobytes()
        if isinstance(reply.ids, np.ndarray):
            assert reply.ids.shape == reply.distances.shape == ((row_num, len(ids) // row_num) if row_num else (0, 0))


def test_canonical_replies_are_read_in_place_and_small_ones_as_lists():
    ids = np.arange(600, dtype=np.int64).reshape(6, 100)
    distances = np.linspace(0, 1, 600, dtype=np.float32).reshape(6, 100)
    data = milvus_pb2.TopKQueryResult(
        status=status_pb2.Status(), row_num=6, ids=ids.ravel().tolist(), distances=distances.ravel().tolist()
    ).SerializeToString()

    reply = wire.decode_topk_hits(data)

    assert not reply.distances.flags.owndata  # a view of the message's bytes, not a copy
    np.testing.assert_array_equal(reply.ids, ids)
    np.testing.assert_array_equal(reply.distances, distances)
    small = wire.decode_topk_hits(
        milvus_pb2.TopKQueryResult(row_num=1, ids=[3, 4], distances=[0.5, 1.5]).SerializeToString()
    )
    assert small.ids == [3, 4] and small.distances == [0.5, 1.5] and small.row_num == 1


@pytest.mark.parametrize(
    "data",
    [b"\x1a\x05\x01\x02", b"\x22\x03abc", b"\x0a\x02\x08", b"\x10\x80", b"\x1a\x02\x80\x80"],
    ids=["truncated ids", "floats not a multiple of 4", "truncated status", "truncated row_num", "unfinished varint"],
)
def test_malformed_bytes_are_a_clear_error(data):
    """What protobuf refuses is an UnexpectedError naming the search result, never a crash."""
    for decode in (wire.decode_topk_result, wire.decode_topk_hits):
        with pytest.raises(UnexpectedError, match="malformed search result"):
            decode(data)


@settings(max_examples=100, deadline=None)
@given(arrays=result_arrays(), with_status=st.booleans())
def test_flat_lists_encode_like_the_arrays(arrays, with_status):
    ids, distances = arrays
    status = status_pb2.Status(error_code=0, reason="") if with_status else None

    from_lists = wire.encode_topk_result(ids.ravel().tolist(), distances.ravel().tolist(), status, max(ids.shape[0], 1))

    expected = wire.encode_topk_result(
        ids if ids.size else np.empty((0, 0), np.int64), distances if ids.size else np.empty((0, 0), np.float32), status
    )
    assert from_lists == expected
    with pytest.raises(ValueError):
        wire.encode_topk_result([1, 2, 3], [0.1, 0.2, 0.3], None, 2)


@pytest.mark.parametrize(
    "varint",
    [
        b"\x00",
        b"\x7f",
        b"\x80\x01",
        b"\xff" * 9 + b"\x01",
        b"\xff" * 9 + b"\x7f",
        b"\xff" * 9 + b"\x02",
        b"\x80" * 9 + b"\x00",
    ],
    ids=["0", "127", "128", "-1", "-1 with bits past 64", "2**63 - 1 from bits past 64", "0 in 10 bytes"],
)
def test_ids_at_the_edges_of_the_varint_decode_as_protobuf_reads_them(varint):
    payload = varint * 3
    distances = np.zeros(3, np.float32).tobytes()
    data = b"\x10\x01\x1a" + wire.varint(len(payload)) + payload + b"\x22\x0c" + distances
    expected = list(milvus_pb2.TopKQueryResult.FromString(data).ids)
    assert wire.decode_topk_result(data).ids.ravel().tolist() == expected


def test_a_varint_longer_than_ten_bytes_is_a_clear_error():
    payload = b"\x80" * 10 + b"\x01"
    data = b"\x10\x01\x1a" + wire.varint(len(payload)) + payload + b"\x22\x04" + bytes(4)
    with pytest.raises(UnexpectedError, match="malformed search result"):
        wire.decode_topk_result(data)

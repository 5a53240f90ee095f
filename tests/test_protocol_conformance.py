"""Our compiled protocol against the descriptors shipped in pymilvus 0.2.12 and 0.2.14.

docs/protocol.md: ours is the 0.2.12 (Milvus 0.9.1) descriptor plus the 0.10 ReloadSegments
RPC and its ReLoadSegmentsParam message. The wheels' modules need the pure-Python protobuf
backend, so their descriptors are dumped by a child process and parsed here on upb.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from milvus_grpc import milvus_pb2, status_pb2
from tests.support.wheels import ROOT, extracted_wheel
from utils.milvus_schema import VECTOR_METHODS

FileDescriptors = list[descriptor_pb2.FileDescriptorProto]
Shape = dict[str, Any]

PKG = "milvus.grpc"
SERVICE = f"/{PKG}.MilvusService"

VECTOR_MESSAGES = [
    "KeyValuePair",
    "CollectionName",
    "CollectionNameList",
    "CollectionSchema",
    "PartitionParam",
    "PartitionList",
    "RowRecord",
    "InsertParam",
    "VectorIds",
    "SearchParam",
    "SearchInFilesParam",
    "SearchByIDParam",
    "TopKQueryResult",
    "StringReply",
    "BoolReply",
    "CollectionRowCount",
    "Command",
    "IndexParam",
    "FlushParam",
    "DeleteByIDParam",
    "CollectionInfo",
    "VectorsIdentity",
    "VectorsData",
    "GetVectorIDsParam",
]
RELOAD_KEYS = {f"message {PKG}.ReLoadSegmentsParam", f"rpc {SERVICE}/ReloadSegments"}

# docs/protocol.md: the 0.2.12 -> 0.2.14 delta, less the two ReloadSegments keys we carry.
HYBRID_DELTA_0_2_14 = {
    *(f"rpc {SERVICE}/{name}" for name in ["HybridSearchPB", "HybridSearch", "GetEntityByID"]),
    *(
        f"message {PKG}.{name}"
        for name in [
            "VectorFieldRecord",
            "VectorParam",
            "HSearchParamPB",  # added
            "VectorFieldValue",  # removed
            "FieldValue",
            "TermQuery",
            "HSearchParam",
            "HSearchInSegmentsParam",
            "AttrRecord",
            "HEntity",
            "HQueryResult",
            "HInsertParam",
            "HEntityIdentity",  # changed
        ]
    ),
}

# Runs in a child with the pure-Python backend; skips milvus/__init__.py (it imports the client).
DUMP = """
import os, sys, types
pkg = types.ModuleType("milvus"); pkg.__path__ = [os.path.join(sys.argv[1], "milvus")]
sys.modules["milvus"] = pkg
from milvus.grpc_gen import status_pb2, milvus_pb2
for mod in (status_pb2, milvus_pb2):
    blob = mod.DESCRIPTOR.serialized_pb
    sys.stdout.buffer.write(len(blob).to_bytes(4, "big") + blob)
"""


def wheel_files(version: str) -> FileDescriptors:
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    env.pop("PYTHONPATH", None)
    raw = subprocess.run(
        [sys.executable, "-c", DUMP, str(extracted_wheel(version))],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    files = []
    while raw:
        size = int.from_bytes(raw[:4], "big")
        files.append(descriptor_pb2.FileDescriptorProto.FromString(raw[4 : 4 + size]))
        raw = raw[4 + size :]
    return files


def project_files() -> FileDescriptors:
    files = []
    for module in (status_pb2, milvus_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        files.append(fdp)
    return files


def shape(files: FileDescriptors) -> Shape:
    """What matters on the wire, keyed by fully qualified name (name, number, type, label, oneof)."""
    result: Shape = {}
    for f in files:
        p = f.package
        for enum in f.enum_type:
            result[f"enum {p}.{enum.name}"] = [(v.name, v.number) for v in enum.value]
        for message in f.message_type:
            result[f"message {p}.{message.name}"] = [
                (
                    fd.number,
                    fd.name,
                    fd.type,
                    fd.type_name,
                    fd.label,
                    message.oneof_decl[fd.oneof_index].name if fd.HasField("oneof_index") else "",
                )
                for fd in message.field
            ]
        for service in f.service:
            for method in service.method:
                result[f"rpc /{p}.{service.name}/{method.name}"] = (
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
    return result


def differing(a: Shape, b: Shape) -> set[str]:
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


@pytest.fixture(scope="module")
def ours() -> Shape:
    return shape(project_files())


@pytest.fixture(scope="module")
def files_0_2_12() -> FileDescriptors:
    return wheel_files("0.2.12")


@pytest.fixture(scope="module")
def ref_0_2_12(files_0_2_12: FileDescriptors) -> Shape:
    return shape(files_0_2_12)


@pytest.fixture(scope="module")
def ref_0_2_14() -> Shape:
    return shape(wheel_files("0.2.14"))


def test_files_have_the_wire_names(files_0_2_12: FileDescriptors) -> None:
    """Bare file names and one package: our serialized files can coexist with pymilvus'."""
    reference = {f.name: f for f in files_0_2_12}
    for fdp in project_files():
        assert fdp.name in reference
        assert (fdp.package, fdp.syntax, list(fdp.dependency)) == (PKG, "proto3", list(reference[fdp.name].dependency))
        assert [s.name for s in fdp.service] == [s.name for s in reference[fdp.name].service]
    assert [s.name for s in milvus_pb2.DESCRIPTOR.services_by_name.values()] == ["MilvusService"]


def test_against_0_2_12_only_reload_segments_is_added(ours: Shape, ref_0_2_12: Shape, ref_0_2_14: Shape) -> None:
    assert differing(ours, ref_0_2_12) == RELOAD_KEYS
    for key in RELOAD_KEYS:
        assert key not in ref_0_2_12
        assert ours[key] == ref_0_2_14[key]


def test_against_0_2_14_the_vector_api_is_identical(ours: Shape, ref_0_2_14: Shape) -> None:
    keys = [f"message {PKG}.{name}" for name in [*VECTOR_MESSAGES, "ReLoadSegmentsParam"]]
    keys += [f"message {PKG}.Status", f"enum {PKG}.ErrorCode"]
    keys += [f"rpc {SERVICE}/{name}" for name in VECTOR_METHODS]  # the 0.9.1 API + ReloadSegments
    for key in keys:
        assert key in ours, key
        assert ours[key] == ref_0_2_14[key], key


def test_against_0_2_14_only_hybrid_keys_differ(ours: Shape, ref_0_2_14: Shape) -> None:
    assert differing(ours, ref_0_2_14) == HYBRID_DELTA_0_2_14


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh `make proto` into a temp dir."""
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)],
        env=dict(os.environ, PYTHON=sys.executable),
        check=True,
        timeout=120,
    )
    return out


@pytest.mark.parametrize(
    "name", ["status_pb2.py", "status_pb2.pyi", "milvus_pb2.py", "milvus_pb2.pyi", "milvus_pb2_grpc.py"]
)
def test_committed_stubs_match_regenerated(name: str, regenerated: Path) -> None:
    """The committed stubs are exactly what scripts/gen_proto.sh makes from the .proto files."""
    assert filecmp.cmp(regenerated / name, ROOT / "milvus_grpc" / name, shallow=False), (
        f"milvus_grpc/{name} differs from a fresh `make proto`; regenerate and commit it"
    )

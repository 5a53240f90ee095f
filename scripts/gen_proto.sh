#!/usr/bin/env bash
# Regenerate the committed gRPC stubs in milvus_grpc/ from its .proto files.
# The proto files keep the bare names status.proto / milvus.proto so the serialized
# descriptors equal the ones inside pymilvus; the generated imports are made package-relative.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-milvus_grpc}"
"$PY" -m grpc_tools.protoc -I milvus_grpc --python_out="$OUT" --grpc_python_out="$OUT" \
  --pyi_out="$OUT" milvus_grpc/status.proto milvus_grpc/milvus.proto
sed -i -E 's/^import (status_pb2|milvus_pb2) as /from . import \1 as /' \
  "$OUT/milvus_pb2.py" "$OUT/milvus_pb2_grpc.py"
sed -i -E 's/^import status_pb2 as /from . import status_pb2 as /' "$OUT/milvus_pb2.pyi"
rm -f "$OUT/status_pb2_grpc.py"  # status.proto has no service

#!/usr/bin/env python3
"""Probe a Mishards (or Milvus) endpoint with the real pymilvus client, as the original demo did.

    python all_in_one/probe_test.py --host 127.0.0.1 --port 19530 [--search]

Prints "Pass: Connected" (green) or "Error: <reason>" (red) and exits 0 or 1. With --search it also
creates a scratch collection, inserts vectors, flushes, checks that each vector finds itself, and
drops the collection. The original called the deprecated `Milvus().connect()`, which raises in
pymilvus 0.2.12 and made the probe always fail; this one uses `Milvus(host, port)`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import types
import uuid

# pymilvus 0.2.12's generated modules need the pure-Python protobuf backend, and it imports a
# class from protobuf's removed C++ extension: give it the class the active backend uses
# (docs/protocol.md, "Old clients on a current protobuf"). Both must happen before pymilvus (or protobuf) is imported.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
_PYEXT = "google.protobuf.pyext._message"
try:
    __import__(_PYEXT)
except ImportError:
    from google.protobuf import descriptor_pb2

    _stand_in = types.ModuleType(_PYEXT)
    _stand_in.RepeatedCompositeContainer = type(descriptor_pb2.DescriptorProto().field)  # type: ignore[attr-defined]
    sys.modules[_PYEXT] = _stand_in

from milvus import Milvus  # noqa: E402 - needs the shim above

RED = "\033[0;31m"
GREEN = "\033[0;32m"
ENDC = "\033[0m"
DIM = 8
ROWS = 200


def fail(reason: object) -> int:
    print(f"{RED}Error: {reason}{ENDC}")
    return 1


def search_round_trip(client: Milvus) -> str | None:
    """Insert, flush and search a scratch collection; None when every query found itself."""
    name = f"probe_{uuid.uuid4().hex[:12]}"
    rng = random.Random(7)
    vectors = [[rng.random() for _ in range(DIM)] for _ in range(ROWS)]
    ids = list(range(1, ROWS + 1))
    status = client.create_collection({"collection_name": name, "dimension": DIM, "metric_type": 1})
    if not status.OK():
        return f"create_collection: {status}"
    try:
        status, _ = client.insert(collection_name=name, records=vectors, ids=ids)
        if not status.OK():
            return f"insert: {status}"
        status = client.flush([name])
        if not status.OK():
            return f"flush: {status}"
        picks = rng.sample(range(ROWS), 5)
        status, results = client.search(name, 1, [vectors[i] for i in picks])
        if not status.OK():
            return f"search: {status}"
        found = [row[0].id if len(row) else None for row in results]
        expected = [ids[i] for i in picks]
        if found != expected:
            return f"search returned {found}, expected {expected}"
        print(f"{GREEN}Pass: Searched {len(picks)} vectors in {ROWS} rows, each found itself{ENDC}")
        return None
    finally:
        client.drop_collection(name)


def probe(host: str, port: int, search: bool) -> int:
    try:
        client = Milvus(host, port)
        status, version = client.server_version()
    except Exception as exc:  # any failure is the probe's answer
        return fail(f"Fail connecting to server on {host}:{port}. {exc}")
    if not status.OK():
        return fail(status)
    print(f"{GREEN}Pass: Connected{ENDC} (server version {version})")
    if not search:
        return 0
    try:
        problem = search_round_trip(client)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    return fail(problem) if problem else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19530)
    parser.add_argument("--search", action="store_true", help="also insert, flush and search a scratch collection")
    args = parser.parse_args()
    return probe(args.host, args.port, args.search)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A tour of Mishards with the stock Milvus 0.9.1 client: create, insert, flush, index, search,
get by id, delete, and the proxy's own `conn_stats` command.

    make run                                  # a local cluster: Mishards on 127.0.0.1:19530
    python3 -m venv client && client/bin/pip install pymilvus==0.2.12
    client/bin/python examples/quickstart.py [--host 127.0.0.1] [--port 19530]

Prints each step and exits 0 when every result is as expected (1 otherwise). The collection it
creates is dropped at the end. Needs nothing but pymilvus 0.2.12 (and so numpy) and
legacy_pymilvus.py beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import legacy_pymilvus  # noqa: F401 - must come before pymilvus (see that file)
import numpy as np
from milvus import IndexType, MetricType, Milvus

DIM = 32
ROWS = 5000


def check(status, step: str) -> None:
    """Stop with the server's reason when a call failed."""
    if not status.OK():
        raise SystemExit(f"{step} failed: code {status.code}: {status.message}")
    print(f"ok   {step}")


def expect(condition: bool, what: str) -> None:
    """Stop when a result is not what Milvus promises."""
    if not condition:
        raise SystemExit(f"unexpected result: {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19530)
    args = parser.parse_args()

    client = Milvus(args.host, args.port)
    name = f"quickstart_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(42)
    vectors = rng.random((ROWS, DIM), dtype=np.float32)
    ids = list(range(1, ROWS + 1))
    try:
        # 1. a collection: 32-dimensional float vectors, L2 distance, segments of at most 16 MB
        check(
            client.create_collection(
                {"collection_name": name, "dimension": DIM, "index_file_size": 16, "metric_type": MetricType.L2}
            ),
            f"create_collection {name}",
        )

        # 2. insert with our own ids (in two batches); writes go to the writable node
        for part in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS)):
            status, inserted = client.insert(name, vectors[part].tolist(), ids=ids[part])
            check(status, f"insert {len(inserted)} vectors")

        # 3. flush: inserted vectors become searchable (and counted) once written as a segment
        check(client.flush([name]), "flush")
        status, count = client.count_entities(name)
        check(status, f"count_entities = {count}")
        expect(count == ROWS, f"{count} entities after inserting {ROWS}")

        # 4. an index; the nodes build it on every segment
        check(client.create_index(name, IndexType.IVF_FLAT, {"nlist": 64}), "create_index IVF_FLAT nlist=64")

        # 5. search: Mishards spreads the segments over the read-only nodes and merges their top-k
        queries = vectors[[10, 2000, 4999]]
        status, results = client.search(name, 5, queries.tolist(), params={"nprobe": 16})
        check(status, "search nq=3 topk=5 nprobe=16")
        for query_id, row in zip((11, 2001, 5000), results, strict=True):
            print(
                f"     query id {query_id}: nearest {[hit.id for hit in row]}, distances "
                f"{[round(hit.distance, 3) for hit in row]}"
            )
            expect(row[0].id == query_id and row[0].distance < 1e-3, f"query {query_id} found {row[0]}")

        # 6. get by id: the stored vectors come back
        status, found = client.get_entity_by_id(name, [1, 2500])
        check(status, "get_entity_by_id [1, 2500]")
        expect(
            np.allclose(found[0], vectors[0], atol=1e-6) and np.allclose(found[1], vectors[2499], atol=1e-6),
            "get_entity_by_id returned other vectors",
        )

        # 7. delete by id; after a flush the vector is gone from searches and counts
        check(client.delete_entity_by_id(name, [11]), "delete_entity_by_id [11]")
        check(client.flush([name]), "flush")
        status, results = client.search(name, 1, vectors[[10]].tolist(), params={"nprobe": 16})
        check(status, "search for the deleted vector")
        expect(results[0][0].id != 11, "the deleted id was still found")
        status, count = client.count_entities(name)
        check(status, f"count_entities = {count}")
        expect(count == ROWS - 1, f"{count} entities after deleting one of {ROWS}")

        # 8. conn_stats: the proxy's view of its nodes (Mishards answers it; a Milvus node would not)
        status, reply = client._cmd("conn_stats")
        check(status, "Cmd conn_stats")
        stats = json.loads(reply)
        print(f"     writable {stats['writable']['address']} healthy={stats['writable']['healthy']}")
        for node, row in stats["readonly"].items():
            print(f"     read-only {node} healthy={row['healthy']} calls={row['calls']} files={row['files_routed']}")
        expect(bool(stats["readonly"]), "no read-only node in conn_stats")
    finally:
        status = client.drop_collection(name)
        print(f"{'ok  ' if status.OK() else 'FAIL'} drop_collection {name}")
    print("all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

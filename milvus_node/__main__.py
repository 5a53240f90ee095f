"""`python -m milvus_node --role single|writable|readonly --port N --meta-uri URI --data-dir DIR`."""

from __future__ import annotations

import os

# One BLAS thread per search: requests already run in parallel on the gRPC thread pool, and several
# nodes share the machine; threaded BLAS oversubscribes the cores (OpenBLAS threads spin) and made
# two read-only nodes 4x slower than one. Must be set before numpy is imported.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, os.environ.get("MILVUS_NODE_BLAS_THREADS", "1"))

import logging
import signal
import sys
import threading

import faiss

from utils.errors import MilvusError

from .config import RuntimeConfig, parse_settings
from .db import NodeDB
from .meta import MetaStore, create_meta_engine
from .server import MilvusNodeServicer, build_server
from .storage import SegmentStore

log = logging.getLogger("milvus_node")


def main(argv: list[str] | None = None) -> int:
    faiss.omp_set_num_threads(1)  # same reason as BLAS above: one thread per search request
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = parse_settings(argv)
    config = RuntimeConfig(settings)
    os.makedirs(os.path.join(settings.data_dir, "db"), exist_ok=True)
    db = NodeDB(
        MetaStore(create_meta_engine(settings.meta_uri), settings.version),
        SegmentStore(settings.data_dir),
        settings.role,
        config,
        settings.merge_after_s,
    )
    try:
        db.start()
    except MilvusError as exc:
        log.error("cannot start: %s", exc.reason)
        return 2
    server, port = build_server(
        MilvusNodeServicer(db, config, settings.version), settings.host, settings.port, settings.workers
    )
    server.start()
    log.info(
        "milvus_node %s serving as %s on %s:%d (data %s)",
        settings.version,
        settings.role,
        settings.host,
        port,
        settings.data_dir,
    )

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    while not stopping.wait(0.5):  # a timed wait: after SIGSTOP/SIGCONT a signal may land on another thread
        pass
    log.info("stopping")
    server.stop(grace=2).wait(5)
    db.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

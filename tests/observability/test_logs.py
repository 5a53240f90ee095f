"""Logs operators can use: one INFO line per search in the rotating LOG_PATH/LOG_NAME.log file."""

from __future__ import annotations

import re
import time

import numpy as np

from tests.support.stubs import milvus_stub, search_param
from tracer.common import describe_payload

from .conftest import COLLECTION, DIM, SEGMENTS, ObservedCluster


def test_one_info_line_per_search(observed: ObservedCluster):
    log_dir = observed.base / "mishards-logs"  # LOG_PATH from the harness; LOG_NAME's default, `logfile`

    def logs() -> str:  # logfile.log; with SERVER_WORKERS > 1 also each worker's logfile-worker-I.log
        return "".join(path.read_text() for path in sorted(log_dir.glob("logfile*.log")))

    queries = np.random.default_rng(8).random((3, DIM)).astype(np.float32)
    with milvus_stub(observed.proxy.address) as stub:
        assert stub.Search(search_param(COLLECTION, queries, 7), timeout=20).status.error_code == 0
    pattern = re.compile(
        rf"INFO mishards\.access: search collection={COLLECTION} nq=3 topk=7 files={SEGMENTS} "
        r"nodes=(\S+) time=(\d+\.\d)ms$",
        re.M,
    )
    deadline = time.monotonic() + 10
    while not pattern.search(logs()) and time.monotonic() < deadline:
        time.sleep(0.1)
    match = pattern.search(logs())
    assert match, logs()[-2000:]
    assert sorted(match.group(1).split(",")) == sorted(n.address for n in observed.readonly)


def test_payloads_for_span_logs_are_readable_and_bounded():
    request = search_param(COLLECTION, np.zeros((1, 4), np.float32), 3).SerializeToString()
    text = describe_payload("/milvus.grpc.MilvusService/Search", request, True)
    assert f'collection_name: "{COLLECTION}"' in text and "topk: 3" in text
    big = search_param(COLLECTION, np.zeros((2000, 128), np.float32), 3).SerializeToString()
    assert describe_payload("/milvus.grpc.MilvusService/Search", big, True) == f"<{len(big)} bytes>"

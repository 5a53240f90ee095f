"""`python -m tests.support.crashing_node --crash-at POINT <milvus_node options>`: the node, killing
itself with SIGKILL when it reaches crash point POINT (see milvus_node/crash_points.py).

A real `kill -9`, placed exactly: in the middle of a flush, an index build, a compaction or a merge.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from milvus_node import crash_points
from milvus_node.__main__ import main as node_main  # before numpy: it sets the BLAS thread counts

log = logging.getLogger("milvus_node.crash")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crash-at", required=True, help="the crash point at which to SIGKILL the node")
    ours, node_argv = parser.parse_known_args(argv)

    def crash(point: str) -> None:
        if point == ours.crash_at:
            log.error("crash point %s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)

    crash_points.install(crash)
    return node_main(node_argv)


if __name__ == "__main__":
    sys.exit(main())

"""Named steps inside the node's multi-step writes, where a test can stop the process dead.

A flush, an index build, a compaction and a merge each write files and then commit meta rows;
recovery must lose and duplicate nothing whichever step a `kill -9` lands after. The write code
calls `reached(point)` at each such step; production installs no observer, so that costs one
comparison. Tests install one that SIGKILLs the node at a chosen point
(tests/support/crashing_node.py). The points:

* `flush.segment_written`: a segment's files are written, its meta row is not.
* `flush.before_wal_retire`: the flush committed, the WAL files it covers are not retired yet.
* `index.file_written`: an index file is written (NEW_INDEX), not yet published as INDEX.
* `compact.new_file_written`, `merge.new_file_written`: the NEW_MERGE file is written, the
  files it replaces not yet retired.
"""

from __future__ import annotations

from collections.abc import Callable

_observer: Callable[[str], None] | None = None


def install(observer: Callable[[str], None] | None) -> None:
    """Call `observer(point)` at every crash point from now on (None: stop)."""
    global _observer
    _observer = observer


def reached(point: str) -> None:
    if _observer is not None:
        _observer(point)

"""Where a search's files are searched: the one place that decides "search on the writable node".

Pure and I/O-free: the planner takes file ids, the read-only nodes with their health, and what a
file group already went through, and answers with groups per node; it never calls a node, reads
the meta DB or looks at the clock. The search executor (search.py), the service (a search with no
flushed file) and the status page (how files spread now) all ask it, so they cannot disagree.

The rules, in order:
- no searchable file yet: the writable node answers the client's plain `Search` (as the
  original Mishards did), nothing is split;
- each file goes to its owner on the router's ring among the healthy read-only nodes;
- a group a node failed goes to the next distinct healthy node of each file, never one already
  tried for it, and to no further read-only node once MAX_RETRY of them were tried;
- the writable node takes files only when no read-only node is left for them (the last resort),
  and a group it failed has nowhere left to go;
- a slow group is hedged on the node failover would pick for most of its files; on the writable
  node only when no healthy read-only node is left untried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from utils.errors import NoAvailableNode

WRITABLE = "<writable>"
"""The writable node's name in plans (read-only nodes are named by their discovery names)."""

Health = Mapping[str, bool]
"""Read-only node name -> healthy."""


class Planner:
    """Plans over a router (`router.Router`: files -> nodes on a ring, some excluded)."""

    def __init__(self, router, max_retry: int) -> None:
        self.router = router
        self.max_retry = max_retry

    @staticmethod
    def unsplit(file_count: int) -> bool:
        """True when the writable node should answer the client's whole `Search` itself: no file
        has been flushed yet, so there is nothing to route."""
        return file_count == 0

    def first(self, file_ids: Sequence[str], nodes: Health) -> dict[str, list[str]]:
        """Where each file is searched first: its owner among the healthy read-only nodes; every
        file on the writable node when none is healthy."""
        try:
            return self.router.assign(file_ids, list(nodes), _unhealthy(nodes))
        except NoAvailableNode:
            return {WRITABLE: list(file_ids)}

    def excluded(self, nodes: Health, tried: Collection[str]) -> set[str]:
        """Nodes a group's files must not go to next: unhealthy, already tried, or every read-only
        node once MAX_RETRY of them were tried."""
        if len(set(tried) - {WRITABLE}) >= self.max_retry:
            return set(nodes)
        return _unhealthy(nodes) | set(tried)

    def reroute(self, file_ids: Sequence[str], nodes: Health, tried: Collection[str]) -> dict[str, list[str]] | None:
        """Where a failed group's files go next; None when the writable node failed them too
        (nowhere is left)."""
        if WRITABLE in tried:
            return None
        try:
            return self.router.assign(file_ids, list(nodes), self.excluded(nodes, tried))
        except NoAvailableNode:
            return {WRITABLE: list(file_ids)}

    def hedge_target(self, file_ids: Sequence[str], nodes: Health, tried: Collection[str]) -> str | None:
        """The node a slow group is raced on: the one failover would pick for most of its files;
        the writable node only when no healthy read-only node is left untried; None when there is
        nowhere to go."""
        try:
            regrouped = self.router.assign(file_ids, list(nodes), self.excluded(nodes, tried))
        except NoAvailableNode:
            readonly_left = any(healthy and name not in tried for name, healthy in nodes.items())
            return None if readonly_left or WRITABLE in tried else WRITABLE
        return max(regrouped, key=lambda node: len(regrouped[node]))


def _unhealthy(nodes: Health) -> set[str]:
    return {name for name, healthy in nodes.items() if not healthy}

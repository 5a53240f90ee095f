"""The one place a node call's outcome is recorded, as Vitess's startAction/endAction.

`started` when a call leaves (files routed, retries), `finished` when it ends (the node's stats
in `Cmd conn_stats`, its latency sample for hedging, its metrics); the search path's other events
(failover, hedge, hedge won, ejection, partial answer, merge) are counted here too, each into
`Cmd conn_stats` and Prometheus alike, so the two cannot drift apart. Nothing else writes the
counters of `nodes.NodeStats` or `metrics.NodeSeries`.

Words, the same in both places:
- failovers: calls this node failed (an error or its own timeout) during a search, whose files
  then had to be answered elsewhere (`mishards_node_failovers_total`, conn_stats `failovers`);
- retries: file groups this node was sent after another node failed them (Prometheus only);
- hedges / hedges_won: hedged calls sent to this node because another was slow / of those, the
  ones it answered first;
- ejections: times the node left routing after slow calls in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from utils.errors import NodeCallError

from .core.hedging import TailTolerance
from .core.planner import WRITABLE
from .nodes import Membership, NodeClient, NodeStats
from .observability.metrics import Metrics

_DISCARDED_STATS = NodeStats()  # counted into when a node left meanwhile


class Accounting:
    def __init__(
        self,
        *,
        membership: Membership,
        writable: NodeClient,
        metrics: Metrics,
        tolerance: TailTolerance,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.membership = membership
        self.writable = writable
        self.metrics = metrics
        self.tolerance = tolerance

    def client(self, node: str) -> NodeClient | None:
        """The client of a planned node (WRITABLE or a read-only name); None when it left."""
        return self.writable if node == WRITABLE else self.membership.get(node)

    def _stats(self, node: str) -> NodeStats:
        client = self.client(node)
        return client.stats if client is not None else _DISCARDED_STATS

    def _metric_name(self, node: str) -> str:
        return self.writable.name if node == WRITABLE else node

    # ------------------------------------------------------------------ one call
    def started(self, node: str, client: NodeClient, files: int, retry: bool) -> None:
        """A search call leaves for `node` with `files` files (`retry`: another node failed them)."""
        client.stats.files_routed += files
        if retry:
            self.metrics.node(self._metric_name(node)).retries += 1

    def finished(
        self, node: str, client: NodeClient | None, started: float, error: NodeCallError | None, sample: bool = True
    ) -> None:
        """A call ended (`started`: the clock's time at launch). `sample`: its latency feeds the
        node's hedge delay and timeout (search calls; not forwarded ones)."""
        if client is None:  # it left during the search: nothing to record it on
            return
        now = self.clock()
        seconds = now - started
        client.record(error is None, seconds, "" if error is None else str(error))
        if error is None and sample:
            self.tolerance.answered(node, now, seconds)
        series = self.metrics.node(self._metric_name(node))
        series.latency.observe(seconds)
        if error is not None:
            series.errors += 1

    # ------------------------------------------------------------------ search events
    def failed_over(self, node: str) -> None:
        self._stats(node).failovers += 1
        self.metrics.node(self._metric_name(node)).failovers += 1

    def hedged(self, node: str) -> None:
        self._stats(node).hedges += 1
        self.metrics.node(self._metric_name(node)).hedges += 1

    def hedge_won(self, node: str) -> None:
        self._stats(node).hedges_won += 1
        self.metrics.node(self._metric_name(node)).hedges_won += 1

    def ejected(self, node: str) -> None:
        self._stats(node).ejections += 1
        self.metrics.node(self._metric_name(node)).ejections += 1

    def partial(self) -> None:
        self.metrics.partial_searches += 1

    def merged(self, seconds: float, fanout: int) -> None:
        self.metrics.merge.observe(seconds)
        self.metrics.fanout.observe(fanout)

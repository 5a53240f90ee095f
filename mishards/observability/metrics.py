"""Prometheus metrics, cheap enough for the search path.

Series are plain counters and fixed-bucket histograms updated only on the server's event loop
thread (no locks: an update is a few attribute increments), and rendered by a prometheus_client
collector when `/metrics` is scraped; a `list(...)` snapshot of each dict keeps the scrape thread
safe against series added meanwhile. Membership size and health are read from the membership at
scrape time, so they cost nothing per request.

With SERVER_WORKERS > 1 each worker keeps its own series; the supervisor sums the workers' texts
at scrape time (`merge_exposition`), so the search path stays free of shared memory and locks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FANOUT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Histogram:
    """Fixed buckets (upper bounds, `le`); `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def quantiles_ms(self, quantiles: tuple[float, ...]) -> list[float | None]:
        """Upper bound (ms) of the bucket holding each quantile; None when it is past the last bound."""
        counts = list(self.counts)
        total = sum(counts)
        out: list[float | None] = []
        for q in quantiles:
            running, rank, bound = 0, q * total, None
            for upper, count in zip(self.bounds, counts, strict=False):
                running += count
                if running >= rank:
                    bound = upper * 1000
                    break
            out.append(bound if total else None)
        return out

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        counts, total = list(self.counts), self.total
        buckets, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total


class RpcSeries:
    """One RPC method: requests, replies with a non-zero Milvus status, latency."""

    __slots__ = ("requests", "errors", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = Histogram()

    def observe(self, seconds: float, status_code: int) -> None:
        self.requests += 1
        if status_code:
            self.errors += 1
        self.latency.observe(seconds)


class NodeSeries:
    """One backend node: its calls' latency, failed calls, retried groups it served, failovers
    (file groups moved away from it after it failed them: the same count as `Cmd conn_stats`),
    hedged calls sent to it and won by it, ejections after slow calls."""

    __slots__ = ("latency", "errors", "retries", "failovers", "hedges", "hedges_won", "ejections")

    def __init__(self) -> None:
        self.latency = Histogram()
        self.errors = 0
        self.retries = 0
        self.failovers = 0
        self.hedges = 0
        self.hedges_won = 0
        self.ejections = 0


class Metrics:
    """The proxy's series, on a registry of its own (several proxies may share a process in tests)."""

    enabled = True

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._rpcs: dict[str, RpcSeries] = {}
        self._nodes: dict[str, NodeSeries] = {}
        self.fanout = Histogram(FANOUT_BUCKETS)
        self.merge = Histogram()
        self.partial_searches = 0  # searches answered without some files (PARTIAL_RESULTS)
        self._meta: dict[str, Histogram] = {}
        self._membership: Callable[[], Iterable[Metric]] = lambda: ()
        self.registry.register(_Collector(self))
        # the standard series (process_cpu_seconds_total, process_resident_memory_bytes, python_gc_*,
        # python_info) that dashboards expect of any Python service
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def rpc(self, method: str) -> RpcSeries:
        """The series of `method`; bound once per handler."""
        return self._rpcs.setdefault(method, RpcSeries())

    def rpc_series(self) -> list[tuple[str, RpcSeries]]:
        """Every method's series (a snapshot of the dict, safe from another thread)."""
        return list(self._rpcs.items())

    def node(self, name: str) -> NodeSeries:
        series = self._nodes.get(name)
        if series is None:
            series = self._nodes[name] = NodeSeries()
        return series

    def meta_query(self, query: str) -> Histogram:
        series = self._meta.get(query)
        if series is None:
            series = self._meta[query] = Histogram()
        return series

    def watch(self, membership: Any, writable: Any) -> None:
        """Report membership size and node health, read at scrape time (`nodes.Membership` and the
        writable `nodes.NodeClient`, duck typed: observability imports no nodes)."""
        self._membership = lambda: _membership_metrics(membership, writable)

    # ------------------------------------------------------------------ rendering
    def collect(self) -> Iterator[Metric]:
        rpcs, nodes, meta = list(self._rpcs.items()), list(self._nodes.items()), list(self._meta.items())
        requests = CounterMetricFamily("mishards_requests", "RPCs answered, by method", labels=["method"])
        errors = CounterMetricFamily(
            "mishards_request_errors", "RPCs answered with a non-zero Milvus status, by method", labels=["method"]
        )
        latency = HistogramMetricFamily(
            "mishards_request_duration_seconds", "RPC latency in the proxy, by method", labels=["method"]
        )
        for method, series in rpcs:
            requests.add_metric([method], series.requests)
            errors.add_metric([method], series.errors)
            buckets, total = series.latency.cumulative()
            latency.add_metric([method], buckets, total)
        yield from (requests, errors, latency)

        node_latency = HistogramMetricFamily(
            "mishards_node_call_duration_seconds",
            "Search calls to a backend node (reloads included), by node",
            labels=["node"],
        )
        node_errors = CounterMetricFamily("mishards_node_errors", "Failed calls to a backend node", labels=["node"])
        node_retries = CounterMetricFamily(
            "mishards_node_retries", "File groups a node searched after another node failed them", labels=["node"]
        )
        node_failovers = CounterMetricFamily(
            "mishards_node_failovers", "File groups moved away from a node after it failed them", labels=["node"]
        )
        node_hedges = CounterMetricFamily(
            "mishards_node_hedges", "Hedged calls sent to a node because another was slow", labels=["node"]
        )
        node_hedges_won = CounterMetricFamily(
            "mishards_node_hedges_won", "Hedged calls to a node that answered first", labels=["node"]
        )
        node_ejections = CounterMetricFamily(
            "mishards_node_ejections", "Times a node left routing after slow calls in a row", labels=["node"]
        )
        for name, node in nodes:
            buckets, total = node.latency.cumulative()
            node_latency.add_metric([name], buckets, total)
            node_errors.add_metric([name], node.errors)
            node_retries.add_metric([name], node.retries)
            node_failovers.add_metric([name], node.failovers)
            node_hedges.add_metric([name], node.hedges)
            node_hedges_won.add_metric([name], node.hedges_won)
            node_ejections.add_metric([name], node.ejections)
        yield from (node_latency, node_errors, node_retries, node_failovers, node_hedges, node_hedges_won)
        yield node_ejections
        partial = CounterMetricFamily(
            "mishards_partial_searches", "Searches answered with some files unsearched (PARTIAL_RESULTS)"
        )
        partial.add_metric([], self.partial_searches)
        yield partial

        fanout = HistogramMetricFamily("mishards_search_fanout_nodes", "Nodes one search was first sent to")
        buckets, total = self.fanout.cumulative()
        fanout.add_metric([], buckets, total)
        merge = HistogramMetricFamily("mishards_merge_duration_seconds", "Time to merge the nodes' top-k lists")
        buckets, total = self.merge.cumulative()
        merge.add_metric([], buckets, total)
        meta_latency = HistogramMetricFamily(
            "mishards_meta_query_duration_seconds",
            "Meta DB reads on the search path (cache hits included), by query",
            labels=["query"],
        )
        for query, histogram in meta:
            buckets, total = histogram.cumulative()
            meta_latency.add_metric([query], buckets, total)
        yield from (fanout, merge, meta_latency)
        yield from self._membership()


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def _membership_metrics(membership: Any, writable: Any) -> Iterator[Metric]:
    nodes, waiting = membership.all(), membership.waiting()
    healthy = sum(1 for client in nodes.values() if client.stats.healthy)
    size = GaugeMetricFamily("mishards_readonly_nodes", "Read-only nodes by state", labels=["state"])
    size.add_metric(["healthy"], healthy)
    size.add_metric(["unhealthy"], len(nodes) - healthy)
    size.add_metric(["waiting"], len(waiting))
    up = GaugeMetricFamily("mishards_node_healthy", "1 when a backend node is healthy", labels=["node", "role"])
    up.add_metric([writable.name, "writable"], 1 if writable.stats.healthy else 0)
    for name, client in sorted(nodes.items()):
        up.add_metric([name, "readonly"], 1 if client.stats.healthy else 0)
    for name in sorted(waiting):
        up.add_metric([name, "readonly"], 0)
    yield from (size, up)


class _NoHistogram(Histogram):
    """Observes nothing."""

    __slots__ = ()

    def observe(self, value: float) -> None:
        pass


class NoMetrics(Metrics):
    """Metrics off (no METRICS_PORT): the same interface, recording nothing, so callers never ask
    whether metrics are on (as `tracer.Tracer` is the no-op tracer). `enabled` lets a hot path skip
    even the clock reads."""

    enabled = False

    def __init__(self) -> None:  # no registry, no collectors
        self._rpcs = {}
        self._nodes = {}
        self.fanout = _NoHistogram(FANOUT_BUCKETS)
        self.merge = _NoHistogram()
        self.partial_searches = 0
        self._meta = {}
        self._membership = lambda: ()
        self._node = NodeSeries()
        self._node.latency = _NoHistogram()
        self._rpc = RpcSeries()
        self._histogram = _NoHistogram()

    def rpc(self, method: str) -> RpcSeries:
        return self._rpc

    def node(self, name: str) -> NodeSeries:
        return self._node

    def meta_query(self, query: str) -> Histogram:
        return self._histogram

    def watch(self, membership, writable) -> None:
        pass


# ---------------------------------------------------------------------------------------------- workers
# Gauges that every worker reports alike (each checks the same nodes): the first worker's value.
_GAUGES_FIRST = frozenset({"mishards_readonly_nodes", "mishards_node_healthy", "python_info", "process_max_fds"})
_GAUGES_MIN = frozenset({"process_start_time_seconds"})


def merge_exposition(texts: list[str], extra: Iterable[Metric] = ()) -> bytes:
    """The Prometheus text of several processes (SERVER_WORKERS) as one: counters and histograms
    summed by series, `*_created` the earliest, gauges summed (memory, open fds: the proxy's total)
    except those every worker reports alike (node health, `python_info`: the first worker's) and
    start times (the earliest). `extra` families are added as they are."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            into = values[family.name]
            if family.type == "gauge":
                rule = "first" if family.name in _GAUGES_FIRST else ("min" if family.name in _GAUGES_MIN else "sum")
            else:
                rule = "sum"
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = sample.value
                elif sample.name.endswith("_created") or rule == "min":
                    into[key] = min(old, sample.value)
                elif rule == "sum":
                    into[key] = old + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry)


def supervisor_families(configured: int, serving: int, restarts: int) -> list[Metric]:
    """The supervisor's own series: workers configured and serving, restarts so far."""
    workers = GaugeMetricFamily("mishards_workers", "Worker processes (SERVER_WORKERS), by state", labels=["state"])
    workers.add_metric(["configured"], configured)
    workers.add_metric(["serving"], serving)
    restarted = CounterMetricFamily("mishards_worker_restarts", "Worker processes restarted after they died")
    restarted.add_metric([], restarts)
    return [workers, restarted]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

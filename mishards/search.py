"""Scatter a search over the read-only nodes, survive the ones that fail or hang, gather and merge.

Each node gets one `SearchInFiles` built around the client's own `SearchParam` bytes. A node
that errs at the transport level is marked unhealthy and its files go to the next distinct node
on the ring (at most MAX_RETRY read-only nodes per file), then to the writable node as a last
resort; the client still gets a complete result, or a status that names the files and nodes that
failed. A node's Milvus status (bad dimension, ...) is an answer, returned as is.

Slow nodes (core/hedging.py holds the policy): a call not answered after its node's hedge delay
is raced on the node failover would pick, within a hedge budget; the first answer wins, the
other call is cancelled. Each call's timeout follows its node's observed latency, bounded by the
request's deadline; a node whose calls time out or lose hedges several times in a row is ejected
from routing at once. With PARTIAL_RESULTS on, a search whose files no node could answer in time
returns what arrived, with an OK status whose reason says how many files were searched.

On backends that implement `ReloadSegments` (0.10, and our node), files whose `updated_time`
is newer than what a node last reloaded are reloaded there first, and recorded only after the
reload succeeded, so deletes are visible on read-only nodes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tracer import Metadata, Tracer
from utils.errors import ConnectFailed, MilvusError, NoAvailableNode, UnexpectedError

from .core import wire
from .core.hedging import TailTolerance
from .core.merge import NodeResult, merge_topk
from .meta import FileSet
from .nodes import Membership, NodeClient, NodeStats
from .observability.metrics import Metrics, NodeSeries

log = logging.getLogger(__name__)
access_log = logging.getLogger("mishards.access")  # one INFO line per search; silence it alone if wanted

WRITABLE = "<writable>"
TIMED_OUT = "DEADLINE_EXCEEDED"  # how a call's own timeout shows in its error text
PARTIAL_MARGIN_S = 0.25  # with partial results on, stop waiting this long before the deadline ...
PARTIAL_MARGIN_SHARE = 0.1  # ... or this share of the time the search had, whichever is less
MAX_FILES_NAMED = 10  # file ids listed in an error
_DISCARDED_STATS = NodeStats()  # counted into when a node left meanwhile
_DISCARDED_SERIES = NodeSeries()  # counted into when metrics are off


def _ready(value):
    """An already completed future (a result known before any call)."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class ReloadTracker:
    """Per node, the `updated_time` of each file as last successfully reloaded there (vectorised)."""

    MAX_FILES_PER_NODE = 200_000

    def __init__(self) -> None:
        self._state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def stale(self, node: str, ids: np.ndarray, updated: np.ndarray) -> np.ndarray:
        """Mask of files the node must reload before searching them."""
        with self._lock:
            known_ids, known_times = self._state.get(node, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if known_ids.size == 0:
            return np.ones(ids.size, dtype=bool)
        pos = np.minimum(np.searchsorted(known_ids, ids), known_ids.size - 1)
        return (known_ids[pos] != ids) | (known_times[pos] < updated)

    def record(self, node: str, ids: np.ndarray, updated: np.ndarray) -> None:
        with self._lock:
            known_ids, known_times = self._state.get(node, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            all_ids = np.concatenate([ids, known_ids])  # new entries first, so unique keeps them
            all_times = np.concatenate([updated, known_times])
            merged_ids, first = np.unique(all_ids, return_index=True)
            if merged_ids.size > self.MAX_FILES_PER_NODE:  # forget everything: the cost is one reload
                merged_ids, first = np.unique(ids, return_index=True)
                all_times = updated
            self._state[node] = (merged_ids, all_times[first])

    def forget(self, node: str) -> None:
        with self._lock:
            self._state.pop(node, None)


@dataclass
class _Job:
    """One call: these files on this node (`attempt`: failovers of these files so far)."""

    node: str
    file_ids: list[str]
    attempt: int
    timeout: float
    hedge: bool = False
    deadline_bound: bool = False  # the timeout is what was left of the request's time, not the node's own


@dataclass
class _Launched:
    """A call in flight: `call` is the RPC's future itself (plain) or a task yielding (ok, payload)."""

    job: _Job
    group: _Group
    client: NodeClient | None
    started: float
    call: asyncio.Future
    plain: bool = False


@dataclass
class _Group:
    """Files searched as one unit, and the calls racing for them (the first one, maybe a hedge)."""

    file_ids: list[str]
    attempt: int = 0
    tried: set[str] = field(default_factory=set)  # nodes sent these files (a racing hedge included)
    errors: list[str] = field(default_factory=list)  # "node: why", of every failed call
    calls: list[_Launched] = field(default_factory=list)
    hedge_at: float | None = None
    open: bool = True  # False once answered, re-routed as new groups, or given up


class _Inflight:
    """The calls in flight of one search, and those completed since the loop last looked.

    One done-callback per call (asyncio.wait would add and remove one per call on every wake-up)."""

    __slots__ = ("calls", "_completed", "_waiter")

    def __init__(self) -> None:
        self.calls: dict[asyncio.Future, _Launched] = {}
        self._completed: deque[asyncio.Future] = deque()
        self._waiter: asyncio.Future | None = None

    def add(self, launched: _Launched) -> None:
        self.calls[launched.call] = launched
        launched.call.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self._completed.append(future)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def completed(self, timeout: float) -> list[asyncio.Future]:
        """The calls completed so far, waiting up to `timeout` seconds for the first."""
        if not self._completed and timeout > 0:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        done = list(self._completed)
        self._completed.clear()
        return done


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True)
class _Request:
    """What every attempt of one search shares."""

    collection: str
    search_param: bytes
    nq: int
    updated: dict[str, int]  # file id -> updated_time
    deadline: float
    stop_at: float  # the deadline, or a little before it when partial results are on
    nodes: dict[str, NodeClient]


class Scatter:
    """One search over many nodes; `run` returns the merged reply bytes.

    One loop per search waits on every call in flight and on the next hedge time (no task per
    node on the plain path). A group whose call is slower than its node's hedge delay is sent
    again to the node failover would pick, budget permitting (core/hedging.py); the first
    complete answer wins and the other call is cancelled (its HTTP/2 stream is reset).
    """

    def __init__(
        self,
        *,
        membership: Membership,
        writable: NodeClient,
        router,
        tracer: Tracer,
        reloads: ReloadTracker,
        max_retry: int,
        metrics: Metrics | None = None,
        tolerance: TailTolerance | None = None,
        partial_results: bool = False,
    ) -> None:
        self.membership = membership
        self.writable = writable
        self.router = router
        self.tracer = tracer
        self.reloads = reloads
        self.max_retry = max_retry
        self.metrics = metrics
        self.tolerance = tolerance or TailTolerance()
        self.partial_results = partial_results

    async def run(
        self,
        collection: str,
        files: FileSet,
        search_param: bytes,
        nq: int,
        topk: int,
        descending: bool,
        deadline: float,
        span=None,
        started: float | None = None,
        match_filter: bool = False,
    ) -> bytes:
        """`started` (time.monotonic() when the request arrived) times the access log line;
        `match_filter` merges SUBSTRUCTURE/SUPERSTRUCTURE replies in reply order."""
        started = time.monotonic() if started is None else started
        nodes = self.membership.all()
        unhealthy = {name for name, client in nodes.items() if not client.stats.healthy}
        with self.tracer.span("get_routing", span):
            groups = self._assign(files.ids, nodes, unhealthy)
        stop_at = deadline
        if self.partial_results:  # answer with what arrived while the client still listens
            stop_at -= min(PARTIAL_MARGIN_S, PARTIAL_MARGIN_SHARE * max(deadline - time.monotonic(), 0.0))
        request = _Request(
            collection,
            search_param,
            nq,
            dict(zip(files.ids, files.updated.tolist(), strict=True)),
            deadline,
            stop_at,
            nodes,
        )
        with self.tracer.span("do_search", span):
            replies, missing = await self._gather(groups, request)
        status = None
        if missing:
            status = self._partial(missing, len(files), collection, span)
        with self.tracer.span("do_merge", span):
            if self.metrics is None:
                ids, distances = merge_topk(replies, nq, topk, descending, match_filter)
            else:
                merge_started = time.perf_counter()
                ids, distances = merge_topk(replies, nq, topk, descending, match_filter)
                self.metrics.merge.observe(time.perf_counter() - merge_started)
                self.metrics.fanout.observe(len(groups))
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "search collection=%s nq=%d topk=%d files=%d nodes=%s time=%.1fms",
                collection,
                nq,
                topk,
                len(files),
                ",".join(groups),
                (time.monotonic() - started) * 1000,
            )
        return wire.encode_topk_result(ids, distances, status, nq)

    # ------------------------------------------------------------------ the loop
    async def _gather(self, assignment: dict[str, list[str]], request: _Request) -> tuple[list, list[_Group]]:
        """Every group's reply, and the groups no node answered (only when partial results are on:
        otherwise those raise). Bounded by the request's stop time; every call left is cancelled."""
        groups: list[_Group] = []
        inflight = _Inflight()
        for node, file_ids in assignment.items():
            group = _Group(file_ids)
            groups.append(group)
            self._start(group, node, request, inflight)
        replies: list = []
        missing: list[_Group] = []
        try:
            while inflight.calls:
                now = time.monotonic()
                if now >= request.stop_at:
                    break
                wake = request.stop_at
                for group in groups:
                    if group.open and group.hedge_at is not None and group.hedge_at < wake:
                        wake = group.hedge_at
                for future in await inflight.completed(wake - now):
                    launched = inflight.calls.pop(future, None)
                    if launched is not None and launched.group.open:
                        self._settled(launched, request, groups, inflight, replies, missing)
                    elif not future.cancelled():
                        future.exception()  # a loser that completed too: its outcome is moot
                now = time.monotonic()
                for group in groups:
                    if group.open and group.hedge_at is not None and group.hedge_at <= now:
                        group.hedge_at = None
                        self._hedge(group, request, inflight)
        finally:
            for future in inflight.calls:  # what the deadline cut off, or the search was cancelled
                future.cancel()
        late = [group for group in groups if group.open]
        if late:
            for group in late:
                nodes = ", ".join(self._address(node) for node in sorted(group.tried))
                group.errors.append(f"no answer before the deadline from {nodes}")
            if not self.partial_results:
                raise self._incomplete(late, request, "the deadline passed")
            missing += late
        if missing and not replies:
            raise self._incomplete(missing, request, "no node answered")
        return replies, missing

    def _settled(
        self,
        launched: _Launched,
        request: _Request,
        groups: list[_Group],
        inflight: _Inflight,
        replies: list,
        missing: list[_Group],
    ) -> None:
        """A call of an open group completed: take its answer, or re-route its files."""
        group, job = launched.group, launched.job
        ok, payload = self._result(launched)
        group.calls.remove(launched)
        if ok:
            replies.append(self._decode(job, payload, request.nq))  # a node's own error status raises
            group.open = False
            for loser in group.calls:  # the other call of a hedged pair
                inflight.calls.pop(loser.call, None)
                loser.call.cancel()
                if job.hedge and not loser.job.hedge:
                    self._slow(loser.job.node, f"lost a hedge to {job.node}")
            if job.hedge:
                self._series(job).hedges_won += 1
                self._client_stats(job.node).hedges_won += 1
            group.calls.clear()
            return
        group.errors.append(f"{self._address(job.node)}: {payload}")
        self._series(job).failovers += 1
        if payload.startswith(TIMED_OUT):
            if not job.deadline_bound:  # the request ran out of time: not the node's fault
                self._slow(job.node, f"a search call timed out after {job.timeout:.2f} s")
        else:
            self._failed(job, payload)
        if group.calls:  # the other call of the pair still races
            return
        group.open = False
        try:
            regrouped = self._reroute(group, request)
        except ConnectFailed:
            if not self.partial_results:
                raise
            missing.append(group)
            return
        for node, file_ids in regrouped.items():
            again = _Group(file_ids, group.attempt + 1, set(group.tried), list(group.errors))
            groups.append(again)
            self._start(again, node, request, inflight)

    # ------------------------------------------------------------------ routing
    def _assign(self, file_ids: list[str], nodes: dict[str, NodeClient], excluded: set[str]) -> dict[str, list[str]]:
        try:
            return self.router.assign(file_ids, list(nodes), excluded)
        except NoAvailableNode:
            log.warning("no healthy read-only node: searching %d file(s) on the writable node", len(file_ids))
            return {WRITABLE: list(file_ids)}

    def _excluded(self, group: _Group, nodes: dict[str, NodeClient]) -> set[str]:
        """Nodes these files must not go to next: unhealthy, already tried, or every read-only node
        once MAX_RETRY of them were tried."""
        tried_readonly = group.tried - {WRITABLE}
        if len(tried_readonly) >= self.max_retry:
            return set(nodes)
        return {name for name, client in nodes.items() if not client.stats.healthy} | group.tried

    def _reroute(self, group: _Group, request: _Request) -> dict[str, list[str]]:
        """Where a failed group's files go: the next distinct healthy node of each file on the ring,
        never one already tried for them; the writable node when none is left."""
        if WRITABLE in group.tried:
            raise self._incomplete([group], request, "every node failed")
        if time.monotonic() >= request.stop_at:
            raise self._incomplete([group], request, "the deadline passed")
        try:
            regrouped = self.router.assign(group.file_ids, list(request.nodes), self._excluded(group, request.nodes))
        except NoAvailableNode:
            regrouped = {WRITABLE: group.file_ids}
        for node in regrouped:
            self._client_stats(node).failovers += 1
        log.warning(
            "re-routed %d file(s) from %s to %s", len(group.file_ids), ", ".join(group.tried), ", ".join(regrouped)
        )
        return regrouped

    def _hedge_target(self, group: _Group, request: _Request) -> str | None:
        """The node failover would pick for most of the group's files; the writable node only
        when no read-only node is left; None when there is nowhere to go."""
        try:
            regrouped = self.router.assign(group.file_ids, list(request.nodes), self._excluded(group, request.nodes))
        except NoAvailableNode:
            readonly_left = any(
                client.stats.healthy and name not in group.tried for name, client in request.nodes.items()
            )
            return None if readonly_left or WRITABLE in group.tried else WRITABLE
        return max(regrouped, key=lambda node: len(regrouped[node]))

    def _hedge(self, group: _Group, request: _Request, inflight: _Inflight) -> None:
        """The group's call is late: race it on another node, if one is left and the budget allows."""
        if not group.calls or time.monotonic() >= request.stop_at:
            return
        target = self._hedge_target(group, request)
        if target is None or not self.tolerance.may_hedge():
            return
        slow = group.calls[0].job.node
        self._start(group, target, request, inflight, hedge=True)
        self._client_stats(target).hedges += 1
        if self.metrics is not None:
            self.metrics.node(self._metric_name(target)).hedges += 1
        log.debug("hedged %d file(s) of %s on %s", len(group.file_ids), slow, target)

    def _client(self, node: str) -> NodeClient | None:
        return self.writable if node == WRITABLE else self.membership.get(node)

    def _client_stats(self, node: str):
        client = self._client(node)
        return client.stats if client is not None else _DISCARDED_STATS

    def _address(self, node: str) -> str:
        return f"writable node {self.writable.address}" if node == WRITABLE else node

    def _metric_name(self, node: str) -> str:
        return self.writable.name if node == WRITABLE else node

    def _series(self, job: _Job):
        return self.metrics.node(self._metric_name(job.node)) if self.metrics is not None else _DISCARDED_SERIES

    # ------------------------------------------------------------------ tail tolerance
    def _slow(self, node: str, why: str) -> None:
        """A call timed out or lost a hedge: eject the node after enough of these in a row."""
        if node == WRITABLE:
            return
        nodes = self.membership.all()
        ejected = sum(1 for client in nodes.values() if not client.stats.healthy)
        if self.tolerance.slow(node, ejected, len(nodes)):
            threshold = self.tolerance.policy.ejection_threshold
            if self.membership.eject(node, f"{threshold} slow calls in a row, the last {why}"):
                self.reloads.forget(node)
                if self.metrics is not None:
                    self.metrics.node(node).ejections += 1

    def _partial(self, missing: list[_Group], total: int, collection: str, span) -> status_pb2.Status:
        """The status of an answer without `missing` files: OK, saying what was searched."""
        lost = sum(len(group.file_ids) for group in missing)
        errors = "; ".join(dict.fromkeys(error for group in missing for error in group.errors))
        reason = f"partial result: searched {total - lost} of {total} files; {lost} unanswered ({errors})"
        log.warning("search of %s answered partially: %s", collection, reason)
        if self.metrics is not None:
            self.metrics.partial_searches += 1
        with self.tracer.span("partial_result", span, files_searched=total - lost, files_total=total):
            pass
        return status_pb2.Status(error_code=0, reason=reason)

    def _incomplete(self, groups: list[_Group], request: _Request, why: str) -> ConnectFailed:
        """The error naming the files no node answered and what each node said."""
        file_ids = [file_id for group in groups for file_id in group.file_ids]
        shown = ", ".join(file_ids[:MAX_FILES_NAMED]) + (", ..." if len(file_ids) > MAX_FILES_NAMED else "")
        errors = "; ".join(dict.fromkeys(error for group in groups for error in group.errors)) or "no answer"
        every = (
            " every read-only node failed, and the writable node too;"
            if any(WRITABLE in group.tried for group in groups)
            else ""
        )
        return ConnectFailed(
            f"no node could search {len(file_ids)} file(s) of {request.collection} ({why}):{every} "
            f"files {shown}; {errors}"
        )

    # ------------------------------------------------------------------ calls
    def _start(
        self,
        group: _Group,
        node: str,
        request: _Request,
        inflight: _Inflight,
        hedge: bool = False,
    ) -> None:
        """Start the group's call on `node` now (on the plain path without a task)."""
        now = time.monotonic()
        remaining = max(request.stop_at - now, 0.001)
        own = remaining if node == WRITABLE else self.tolerance.attempt_timeout(node, now, group.attempt)
        timeout = min(own, remaining)  # the writable node, the last resort, gets all the time left
        job = _Job(node, group.file_ids, group.attempt, timeout, hedge, deadline_bound=timeout >= remaining)
        group.tried.add(node)
        launched = self._launch(job, group, request)
        group.calls.append(launched)
        inflight.add(launched)
        if not hedge:
            self.tolerance.first_call()
            if node != WRITABLE and self.tolerance.policy.hedging:
                group.hedge_at = now + self.tolerance.hedge_delay(node, now)

    def _launch(self, job: _Job, group: _Group, request: _Request) -> _Launched:
        client = self._client(job.node)
        if client is None:
            return _Launched(
                job, group, None, 0.0, _ready((False, f"read-only node {job.node} left during the search"))
            )
        if job.attempt and self.metrics is not None:
            self.metrics.node(self._metric_name(job.node)).retries += 1
        client.stats.files_routed += len(job.file_ids)
        stale = None
        if client.supports_reload and job.node != WRITABLE:
            ids = np.array(job.file_ids, dtype=np.int64)
            times = np.array([request.updated[f] for f in job.file_ids], dtype=np.int64)
            mask = self.reloads.stale(job.node, ids, times)
            if mask.any():
                stale = (ids[mask], times[mask])
        started = time.monotonic()
        if stale is None and not self.tracer.enabled:
            message = wire.search_in_files_request(job.file_ids, request.search_param)
            call = client.rpc("SearchInFiles")(message, timeout=job.timeout)
            if not isinstance(call, asyncio.Future):  # grpc.aio's call object
                call = asyncio.ensure_future(call)
            return _Launched(job, group, client, started, call, plain=True)
        return _Launched(job, group, client, started, asyncio.ensure_future(self._attempt(job, client, request, stale)))

    def _result(self, launched: _Launched) -> tuple[bool, bytes | str]:
        """(True, reply bytes) or (False, why the node failed) of a completed call."""
        if not launched.plain:
            return launched.call.result()
        try:
            reply = launched.call.result()
        except grpc.RpcError as exc:
            error = f"{exc.code().name} {exc.details() or ''}".strip()
            self._record(launched.job, launched.client, launched.started, error)
            return False, error
        self._record(launched.job, launched.client, launched.started)
        return True, reply

    async def _attempt(
        self, job: _Job, client: NodeClient, request: _Request, stale: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[bool, bytes | str]:
        """A call that needs a reload first, or a span around it."""
        if not self.tracer.enabled:
            return await self._call(job, client, request, stale, None)
        with self.tracer.span(
            f"search_{client.address}", node=job.node, files=len(job.file_ids), attempt=job.attempt, hedge=job.hedge
        ) as span:
            outcome = await self._call(job, client, request, stale, self.tracer.outgoing_metadata())
            if not outcome[0]:
                self.tracer.set_error(span, outcome[1])
        return outcome

    async def _call(
        self,
        job: _Job,
        client: NodeClient,
        request: _Request,
        stale: tuple[np.ndarray, np.ndarray] | None,
        metadata: Metadata | None,
    ) -> tuple[bool, bytes | str]:
        started = time.monotonic()
        if stale is not None:
            try:
                error = await self._reload(job, client, request.collection, stale, metadata)
            except grpc.RpcError as exc:
                error = f"{exc.code().name} {exc.details() or ''}".strip()
            if error:
                self._record(job, client, started, error)
                return False, error
        message = wire.search_in_files_request(job.file_ids, request.search_param)
        remaining = max(job.timeout - (time.monotonic() - started), 0.001)
        try:
            reply = await client.rpc("SearchInFiles")(message, timeout=remaining, metadata=metadata)
        except grpc.RpcError as exc:
            error = f"{exc.code().name} {exc.details() or ''}".strip()
            self._record(job, client, started, error)
            return False, error
        self._record(job, client, started)
        return True, reply

    def _record(self, job: _Job, client: NodeClient, started: float, error: str = "") -> None:
        """A node call's outcome: the node's stats, its latency sample, and, when on, its metrics."""
        now = time.monotonic()
        seconds = now - started
        client.record(not error, seconds, error)
        if not error:
            self.tolerance.answered(job.node, now, seconds)
        if self.metrics is None:
            return
        series = self.metrics.node(self._metric_name(job.node))
        series.latency.observe(seconds)
        if error:
            series.errors += 1

    async def _reload(
        self,
        job: _Job,
        client: NodeClient,
        collection: str,
        stale: tuple[np.ndarray, np.ndarray],
        metadata: Metadata | None,
    ) -> str:
        """Reload files changed since this node last reloaded them; an error text, or "" when fine."""
        ids, times = stale
        request = pb.ReLoadSegmentsParam(collection_name=collection, segment_id_array=[str(i) for i in ids.tolist()])
        try:
            raw = await client.rpc("ReloadSegments")(
                request.SerializeToString(), timeout=job.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a 0.9 backend: nothing to reload
                client.supports_reload = False
                return ""
            raise
        status = status_pb2.Status.FromString(raw)
        if status.error_code != 0:
            return f"ReloadSegments answered {status.error_code}: {status.reason}"
        self.reloads.record(job.node, ids, times)
        return ""

    def _decode(self, job: _Job, payload: bytes, nq: int) -> NodeResult:
        """A node's hits for the merge: lists for small replies, arrays otherwise (decode_topk_hits)."""
        code, reason, row_num, ids, distances = wire.decode_topk_hits(payload)
        if code != 0:
            raise MilvusError(reason, code)  # the node's own answer, e.g. a dimension mismatch
        if row_num == 0:
            return [], []
        if row_num != nq:
            raise UnexpectedError(f"read-only node {job.node} returned {row_num} rows for {nq} queries")
        return ids, distances

    def _failed(self, job: _Job, error: str) -> None:
        if job.node == WRITABLE:
            log.warning("writable node failed a search: %s", error)
        else:
            self.membership.mark_failed(job.node, error)
            self.reloads.forget(job.node)

"""Scatter a search over the read-only nodes, survive the ones that fail or hang, gather and merge.

Three parts, each visible on its own:
- the planner (planner.py, pure): which node searches which files first, where a failed group
  goes next, where a slow one is hedged; the one place that decides "search on the writable node";
- the executor (`Scatter`, here): launches each group's `SearchInFiles` over the node-call port,
  races hedges, fails over, cancels what is left at the deadline; every call ends as one typed
  `Outcome` (a reply, or a `NodeCallError` saying why not), on one code path;
- the accounting point (accounting.py): every call's stats, latency sample and metrics recorded
  once, when its outcome is settled.

Each node gets one `SearchInFiles` built around the client's own `SearchParam` bytes. A node
that errs at the transport level is marked unhealthy and its files go where the planner says (the
next distinct node on the ring, at most MAX_RETRY read-only nodes per file, then the writable
node as a last resort); the client still gets a complete result, or a status that names the files
and nodes that failed. A node's Milvus status (bad dimension, ...) is an answer, returned as is.

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
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tracer import Metadata, Tracer
from utils.errors import (
    ConnectFailed,
    MilvusError,
    NodeCallError,
    NodeDeadline,
    NodeUnavailable,
    NodeUnimplemented,
    UnexpectedError,
)

from .accounting import Accounting
from .core import wire
from .core.hedging import TailTolerance
from .core.merge import NodeResult, merge_topk
from .core.planner import WRITABLE, Planner
from .meta import FileSet
from .nodes import Membership, NodeClient
from .observability.metrics import Metrics, NoMetrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("mishards.access")  # one INFO line per search; silence it alone if wanted

PARTIAL_MARGIN_S = 0.25  # with partial results on, stop waiting this long before the deadline ...
PARTIAL_MARGIN_SHARE = 0.1  # ... or this share of the time the search had, whichever is less
MAX_FILES_NAMED = 10  # file ids listed in an error


# ---------------------------------------------------------------------- the codec and merge, in one place each
def search_in_files_request(file_ids: list[str], search_param: bytes) -> bytes:
    """The `SearchInFiles` message for some files around the client's own `SearchParam` bytes."""
    return wire.search_in_files_request(file_ids, search_param)


def decode_reply(node: str, payload: bytes, nq: int) -> NodeResult:
    """A node's hits for the merge (lists for small replies, arrays otherwise: `wire.decode_topk_hits`);
    its own error status raises as the MilvusError it is."""
    code, reason, row_num, ids, distances = wire.decode_topk_hits(payload)
    if code != 0:
        raise MilvusError(reason, code)  # the node's own answer, e.g. a dimension mismatch
    if row_num == 0:
        return [], []
    if row_num != nq:
        raise UnexpectedError(f"read-only node {node} returned {row_num} rows for {nq} queries")
    return cast(NodeResult, (ids, distances))  # both lists or both arrays (decode_topk_hits)


def merge_replies(
    replies: list[NodeResult], nq: int, topk: int, descending: bool, match_filter: bool
) -> tuple[np.ndarray, np.ndarray] | tuple[list[int], list[float]]:
    """The nodes' top-k lists merged into one."""
    return merge_topk(replies, nq, topk, descending, match_filter)


def encode_reply(ids, distances, status: status_pb2.Status | None, nq: int) -> bytes:
    """The client's `TopKQueryResult` bytes (arrays, or the merge's flat lists of `nq` rows)."""
    return wire.encode_topk_result(ids, distances, status, nq)


class ReloadTracker:
    """Per node, the `updated_time` of each file as last successfully reloaded there.

    Dicts, not arrays: a search's group is a handful of files, where numpy's fixed cost per call
    (three arrays and a search per node call) outweighed the lookups (measured at saturation).
    """

    MAX_FILES_PER_NODE = 200_000
    _NEVER = -1  # the reload time of a file never reloaded: below every updated_time

    def __init__(self) -> None:
        self._state: dict[str, dict[str, int]] = {}

    def stale(self, node: str, file_ids: Sequence[str], updated: Mapping[str, int]) -> list[str]:
        """The files the node must reload before searching them: never reloaded there, or changed since."""
        known = self._state.get(node)
        if not known:
            return list(file_ids)
        never = self._NEVER
        return [file_id for file_id in file_ids if known.get(file_id, never) < updated[file_id]]

    def record(self, node: str, file_ids: Sequence[str], updated: Mapping[str, int]) -> None:
        """The node reloaded these files as of their `updated` times (the newest time is kept)."""
        known = self._state.setdefault(node, {})
        if len(known) + len(file_ids) > self.MAX_FILES_PER_NODE:  # forget the rest: the cost is one reload
            known.clear()
        for file_id in file_ids:
            time_now = updated[file_id]
            if known.get(file_id, self._NEVER) < time_now:
                known[file_id] = time_now

    def forget(self, node: str) -> None:
        self._state.pop(node, None)


class ReloadRefused(NodeCallError):
    """The node answered `ReloadSegments` with a non-zero Milvus status: its files cannot be searched there."""

    def __init__(self, code: int, reason: str) -> None:
        text = f"ReloadSegments answered {code}: {reason}"
        super().__init__(text)
        self.args = (text,)  # shown as is, without a gRPC code name


@dataclass(slots=True)
class Outcome:
    """How one node call ended: the reply bytes, or the error that says why there is none."""

    reply: bytes = b""
    error: NodeCallError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def of(cls, future: asyncio.Future) -> Outcome:
        """The outcome of a completed call's future (anything but a NodeCallError is a bug: it raises)."""
        try:
            return cls(reply=future.result())
        except NodeCallError as exc:
            return cls(error=exc)


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
class _Call:
    """A call in flight: `future` yields the reply bytes or raises NodeCallError, whether it is the
    port's own future (the usual case, no task) or a task that reloads first or holds a span."""

    job: _Job
    group: _Group
    client: NodeClient | None
    started: float
    future: asyncio.Future


@dataclass
class _Group:
    """Files searched as one unit, and the calls racing for them (the first one, maybe a hedge)."""

    file_ids: list[str]
    attempt: int = 0
    tried: set[str] = field(default_factory=set)  # nodes sent these files (a racing hedge included)
    errors: list[str] = field(default_factory=list)  # "node: why", of every failed call
    calls: list[_Call] = field(default_factory=list)
    hedge_at: float | None = None
    open: bool = True  # False once answered, re-routed as new groups, or given up


class _Inflight:
    """The calls in flight of one search, and those completed since the loop last looked.

    One done-callback per call (asyncio.wait would add and remove one per call on every wake-up)."""

    __slots__ = ("calls", "_completed", "_waiter")

    def __init__(self) -> None:
        self.calls: dict[asyncio.Future, _Call] = {}
        self._completed: deque[asyncio.Future] = deque()
        self._waiter: asyncio.Future | None = None

    def add(self, launched: _Call) -> None:
        self.calls[launched.future] = launched
        launched.future.add_done_callback(self._done)

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


def _health(nodes: dict[str, NodeClient]) -> dict[str, bool]:
    """The read-only nodes as the planner sees them: name -> healthy, now."""
    return {name: client.stats.healthy for name, client in nodes.items()}


class Scatter:
    """The executor: one search over many nodes; `run` returns the merged reply bytes.

    One loop per search waits on every call in flight and on the next hedge time (no task per
    call unless it reloads first or is traced). A group whose call is slower than its node's
    hedge delay is sent again where the planner says, budget permitting (core/hedging.py); the
    first complete answer wins and the other call is cancelled (its HTTP/2 stream is reset).
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
        accounting: Accounting | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`metrics` None is NoMetrics; `accounting` is built from the others unless shared (the
        service's); `clock` is the event loop's (time.monotonic; tests run on a virtual one)."""
        self.clock = clock
        self.membership = membership
        self.writable = writable
        self.planner = Planner(router, max_retry)
        self.tracer = tracer
        self.reloads = reloads
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.tolerance = tolerance or TailTolerance()
        self.partial_results = partial_results
        self.accounting = accounting or Accounting(
            membership=membership, writable=writable, metrics=self.metrics, tolerance=self.tolerance, clock=clock
        )

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
        started = self.clock() if started is None else started
        nodes = self.membership.all()
        with self.tracer.span("get_routing", span):
            groups = self.planner.first(files.ids, _health(nodes))
        stop_at = deadline
        if self.partial_results:  # answer with what arrived while the client still listens
            stop_at -= min(PARTIAL_MARGIN_S, PARTIAL_MARGIN_SHARE * max(deadline - self.clock(), 0.0))
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
            if self.metrics.enabled:
                merge_started = time.perf_counter()
                ids, distances = merge_replies(replies, nq, topk, descending, match_filter)
                self.accounting.merged(time.perf_counter() - merge_started, len(groups))
            else:
                ids, distances = merge_replies(replies, nq, topk, descending, match_filter)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "search collection=%s nq=%d topk=%d files=%d nodes=%s time=%.1fms",
                collection,
                nq,
                topk,
                len(files),
                ",".join(groups),
                (self.clock() - started) * 1000,
            )
        return encode_reply(ids, distances, status, nq)

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
                now = self.clock()
                if now >= request.stop_at:
                    break
                wake = request.stop_at
                for group in groups:
                    if group.open and group.hedge_at is not None and group.hedge_at < wake:
                        wake = group.hedge_at
                for future in await inflight.completed(wake - now):
                    call = inflight.calls.pop(future, None)
                    if call is not None and call.group.open:
                        self._settled(call, request, groups, inflight, replies, missing)
                    elif not future.cancelled():
                        future.exception()  # a loser that completed too: its outcome is moot
                now = self.clock()
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
        call: _Call,
        request: _Request,
        groups: list[_Group],
        inflight: _Inflight,
        replies: list,
        missing: list[_Group],
    ) -> None:
        """A call of an open group completed: record it, then take its answer or re-route its files."""
        group, job = call.group, call.job
        outcome = Outcome.of(call.future)
        self.accounting.finished(job.node, call.client, call.started, outcome.error)
        group.calls.remove(call)
        if outcome.ok:
            replies.append(decode_reply(job.node, outcome.reply, request.nq))  # a node's own error status raises
            group.open = False
            for loser in group.calls:  # the other call of a hedged pair
                inflight.calls.pop(loser.future, None)
                loser.future.cancel()
                if job.hedge and not loser.job.hedge:
                    self._slow(loser.job.node, f"lost a hedge to {job.node}")
            if job.hedge:
                self.accounting.hedge_won(job.node)
            group.calls.clear()
            return
        error = outcome.error
        group.errors.append(f"{self._address(job.node)}: {error}")
        self.accounting.failed_over(job.node)
        if isinstance(error, NodeDeadline):
            if not job.deadline_bound:  # the request ran out of time: not the node's fault
                self._slow(job.node, f"a search call timed out after {job.timeout:.2f} s")
        else:
            self._failed(job, str(error))
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

    # ------------------------------------------------------------------ asking the planner
    def _reroute(self, group: _Group, request: _Request) -> dict[str, list[str]]:
        """Where a failed group's files go (the planner's answer), or ConnectFailed when nowhere
        is left or the time is up."""
        regrouped = self.planner.reroute(group.file_ids, _health(request.nodes), group.tried)
        if regrouped is None:
            raise self._incomplete([group], request, "every node failed")
        if self.clock() >= request.stop_at:
            raise self._incomplete([group], request, "the deadline passed")
        log.warning(
            "re-routed %d file(s) from %s to %s", len(group.file_ids), ", ".join(group.tried), ", ".join(regrouped)
        )
        return regrouped

    def _hedge(self, group: _Group, request: _Request, inflight: _Inflight) -> None:
        """The group's call is late: race it where the planner says, if anywhere and the budget allows."""
        if not group.calls or self.clock() >= request.stop_at:
            return
        target = self.planner.hedge_target(group.file_ids, _health(request.nodes), group.tried)
        if target is None or not self.tolerance.may_hedge():
            return
        slow = group.calls[0].job.node
        self._start(group, target, request, inflight, hedge=True)
        self.accounting.hedged(target)
        log.debug("hedged %d file(s) of %s on %s", len(group.file_ids), slow, target)

    def _address(self, node: str) -> str:
        return f"writable node {self.writable.address}" if node == WRITABLE else node

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
                self.accounting.ejected(node)

    def _failed(self, job: _Job, error: str) -> None:
        if job.node == WRITABLE:
            log.warning("writable node failed a search: %s", error)
        else:
            self.membership.mark_failed(job.node, error)
            self.reloads.forget(job.node)

    def _partial(self, missing: list[_Group], total: int, collection: str, span) -> status_pb2.Status:
        """The status of an answer without `missing` files: OK, saying what was searched."""
        lost = sum(len(group.file_ids) for group in missing)
        errors = "; ".join(dict.fromkeys(error for group in missing for error in group.errors))
        reason = f"partial result: searched {total - lost} of {total} files; {lost} unanswered ({errors})"
        log.warning("search of %s answered partially: %s", collection, reason)
        self.accounting.partial()
        with self.tracer.span("partial_result", span, files_searched=total - lost, files_total=total):
            pass
        return status_pb2.Status(reason=reason)  # SUCCESS, with the reason

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
        """Start the group's call on `node` now."""
        now = self.clock()
        remaining = max(request.stop_at - now, 0.001)
        own = remaining if node == WRITABLE else self.tolerance.attempt_timeout(node, now, group.attempt)
        timeout = min(own, remaining)  # the writable node, the last resort, gets all the time left
        job = _Job(node, group.file_ids, group.attempt, timeout, hedge, deadline_bound=timeout >= remaining)
        group.tried.add(node)
        call = self._launch(job, group, request)
        group.calls.append(call)
        inflight.add(call)
        if not hedge:
            self.tolerance.first_call()
            if node != WRITABLE and self.tolerance.policy.hedging:
                group.hedge_at = now + self.tolerance.hedge_delay(node, now)

    def _launch(self, job: _Job, group: _Group, request: _Request) -> _Call:
        """The call's future: the port's own (no task) unless the node must reload first or a span
        wraps the call."""
        client = self.accounting.client(job.node)
        if client is None:
            left = asyncio.get_running_loop().create_future()
            left.set_exception(NodeUnavailable(f"read-only node {job.node} left during the search"))
            return _Call(job, group, None, 0.0, left)
        self.accounting.started(job.node, client, len(job.file_ids), retry=job.attempt > 0)
        stale: list[str] = []
        if client.supports_reload and job.node != WRITABLE:
            stale = self.reloads.stale(job.node, job.file_ids, request.updated)
        started = self.clock()
        if not stale and not self.tracer.enabled:
            message = search_in_files_request(job.file_ids, request.search_param)
            return _Call(job, group, client, started, client.call("SearchInFiles", message, job.timeout))
        return _Call(job, group, client, started, asyncio.ensure_future(self._in_task(job, client, request, stale)))

    async def _in_task(self, job: _Job, client: NodeClient, request: _Request, stale: list[str]) -> bytes:
        """A call that needs a reload first, or a span around it: run as a task."""
        if not self.tracer.enabled:
            return await self._reload_then_search(job, client, request, stale, None)
        with self.tracer.span(
            f"search_{client.address}", node=job.node, files=len(job.file_ids), attempt=job.attempt, hedge=job.hedge
        ) as span:
            try:
                return await self._reload_then_search(job, client, request, stale, self.tracer.outgoing_metadata())
            except NodeCallError as exc:
                self.tracer.set_error(span, str(exc))
                raise

    async def _reload_then_search(
        self,
        job: _Job,
        client: NodeClient,
        request: _Request,
        stale: list[str],
        metadata: Metadata | None,
    ) -> bytes:
        started = self.clock()
        if stale:
            await self._reload(job, client, request, stale, metadata)
        message = search_in_files_request(job.file_ids, request.search_param)
        remaining = max(job.timeout - (self.clock() - started), 0.001)
        return await client.call("SearchInFiles", message, remaining, metadata)

    async def _reload(
        self,
        job: _Job,
        client: NodeClient,
        search: _Request,
        stale: list[str],
        metadata: Metadata | None,
    ) -> None:
        """Reload files changed since this node last reloaded them; NodeCallError when it failed."""
        request = pb.ReLoadSegmentsParam(collection_name=search.collection, segment_id_array=stale)
        try:
            raw = await client.call("ReloadSegments", request.SerializeToString(), job.timeout, metadata)
        except NodeUnimplemented:  # a 0.9 backend: nothing to reload
            client.supports_reload = False
            return
        status = status_pb2.Status.FromString(raw)
        if status.error_code != 0:
            raise ReloadRefused(status.error_code, status.reason)
        self.reloads.record(job.node, stale, search.updated)

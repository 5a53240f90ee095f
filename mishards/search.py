"""Scatter a search over the read-only nodes, survive the ones that fail, gather and merge.

Each node gets one `SearchInFiles` built around the client's own `SearchParam` bytes. A node
that errs at the transport level, hangs past its share of the deadline, or answers garbage is
marked unhealthy and its files go to the next distinct node on the ring, then to the writable
node as a last resort; the client still gets a complete result, or a status that names what
failed. A node's Milvus status (bad dimension, ...) is an answer, returned as is.

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
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from tracer import Metadata, Tracer
from utils.errors import ConnectFailed, MilvusError, NoAvailableNode, UnexpectedError

from .core import wire
from .core.merge import merge_topk
from .meta import FileSet
from .nodes import Membership, NodeClient
from .observability.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("mishards.access")  # one INFO line per search; silence it alone if wanted

WRITABLE = "<writable>"


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
    node: str
    file_ids: list[str]
    attempt: int


@dataclass
class _Launched:
    """A group's call in flight: `call` is the RPC itself (plain) or a task yielding (ok, payload)."""

    job: _Job
    client: NodeClient | None
    started: float
    call: Any
    plain: bool = False


@dataclass(frozen=True)
class _Request:
    """What every attempt of one search shares."""

    collection: str
    search_param: bytes
    nq: int
    updated: dict[str, int]  # file id -> updated_time
    deadline: float
    nodes: dict[str, NodeClient]


class Scatter:
    """One search over many nodes; `run` returns the merged reply bytes."""

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
    ) -> None:
        self.membership = membership
        self.writable = writable
        self.router = router
        self.tracer = tracer
        self.reloads = reloads
        self.max_retry = max_retry
        self.metrics = metrics

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
        request = _Request(
            collection, search_param, nq, dict(zip(files.ids, files.updated.tolist(), strict=True)), deadline, nodes
        )
        with self.tracer.span("do_search", span):
            replies = await self._serve_all(
                [_Job(node, file_ids, 0) for node, file_ids in groups.items()], frozenset(), request
            )
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
        return wire.encode_topk_result(ids, distances)

    async def _serve_all(self, jobs: list[_Job], tried: frozenset[str], request: _Request) -> list:
        """Every group's replies. All calls start before any is awaited (no task per node on the
        plain path); groups whose node failed are re-routed together, away from every node that
        failed, and each round is bounded by the deadline."""
        pending = deque(self._launch(job, request) for job in jobs)
        replies: list = []
        retry: list[_Job] = []
        failed: set[str] = set()
        answer: BaseException | None = None
        try:
            while pending:  # every call is awaited, so none is left unobserved
                ok, payload = await self._settle(pending[0])
                job = pending.popleft().job
                if not ok:
                    if self.metrics is not None:
                        self.metrics.node(self.writable.name if job.node == WRITABLE else job.node).failovers += 1
                    self._failed(job, payload)
                    failed.add(job.node)
                    retry.append(job)
                    continue
                try:
                    replies.append(self._decode(job, payload, request.nq))
                except MilvusError as exc:
                    answer = answer or exc
        finally:
            for launched in pending:  # the search was cancelled: so are its calls
                launched.call.cancel()
        if answer is not None:
            raise answer  # a node's own answer (e.g. a dimension mismatch) is the search's answer
        if retry:
            tried = tried | failed
            jobs = [again for job in retry for again in self._reassign(job, request.nodes, tried)]
            replies += await self._serve_all(jobs, tried, request)
        return replies

    # ------------------------------------------------------------------ routing
    def _assign(self, file_ids: list[str], nodes: dict[str, NodeClient], excluded: set[str]) -> dict[str, list[str]]:
        try:
            return self.router.assign(file_ids, list(nodes), excluded)
        except NoAvailableNode:
            log.warning("no healthy read-only node: searching %d file(s) on the writable node", len(file_ids))
            return {WRITABLE: list(file_ids)}

    def _reassign(self, job: _Job, nodes: dict[str, NodeClient], tried: frozenset[str]) -> list[_Job]:
        """Where a failed group's files go: the next distinct healthy node of each file on the ring,
        never one already tried for them; the writable node when none is left."""
        excluded = {name for name, client in nodes.items() if not client.stats.healthy} | tried
        if job.node == WRITABLE:
            raise ConnectFailed(
                f"no node could search {len(job.file_ids)} file(s): every read-only node failed, "
                f"and the writable node {self.writable.address} too ({self.writable.stats.last_error})"
            )
        try:
            groups = self.router.assign(job.file_ids, list(nodes), excluded)
        except NoAvailableNode:
            groups = {WRITABLE: job.file_ids}
        jobs = []
        for node, file_ids in groups.items():
            client = self.writable if node == WRITABLE else nodes[node]
            client.stats.failovers += 1
            jobs.append(_Job(node, file_ids, job.attempt + 1))
        log.warning("re-routed %d file(s) from %s to %s", len(job.file_ids), job.node, ", ".join(groups))
        return jobs

    def _client(self, node: str) -> NodeClient | None:
        return self.writable if node == WRITABLE else self.membership.get(node)

    def _timeout(self, job: _Job, deadline: float) -> float:
        """This attempt's share of what is left, so later attempts still have time."""
        remaining = max(deadline - time.monotonic(), 0.001)
        return remaining / max(1, self.max_retry - job.attempt)

    # ------------------------------------------------------------------ calls
    def _launch(self, job: _Job, request: _Request) -> _Launched:
        """Start the group's call now (on the plain path without a task)."""
        client = self._client(job.node)
        if client is None:
            return _Launched(job, None, 0.0, _ready((False, f"read-only node {job.node} left during the search")))
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
            call = client.rpc("SearchInFiles")(message, timeout=self._timeout(job, request.deadline))
            return _Launched(job, client, started, call, plain=True)
        return _Launched(job, client, started, asyncio.ensure_future(self._attempt(job, client, request, stale)))

    async def _settle(self, launched: _Launched) -> tuple[bool, bytes | str]:
        """(True, reply bytes) or (False, why the node failed); never raises for a node's failure."""
        if not launched.plain:
            return await launched.call
        return await self._outcome(launched.job, launched.client, launched.call, launched.started)

    async def _attempt(
        self, job: _Job, client: NodeClient, request: _Request, stale: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[bool, bytes | str]:
        """A call that needs a reload first, or a span around it."""
        if not self.tracer.enabled:
            return await self._call(job, client, request, stale, None)
        with self.tracer.span(
            f"search_{client.address}", node=job.node, files=len(job.file_ids), attempt=job.attempt
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
                error = await self._reload(job, client, request.collection, stale, request.deadline, metadata)
            except grpc.RpcError as exc:
                error = f"{exc.code().name} {exc.details() or ''}".strip()
            if error:
                self._record(job, client, started, error)
                return False, error
        message = wire.search_in_files_request(job.file_ids, request.search_param)
        call = client.rpc("SearchInFiles")(message, timeout=self._timeout(job, request.deadline), metadata=metadata)
        return await self._outcome(job, client, call, started)

    async def _outcome(
        self, job: _Job, client: NodeClient, call: Awaitable[bytes], started: float
    ) -> tuple[bool, bytes | str]:
        try:
            reply = await call
        except grpc.RpcError as exc:
            error = f"{exc.code().name} {exc.details() or ''}".strip()
            self._record(job, client, started, error)
            return False, error
        self._record(job, client, started)
        return True, reply

    def _record(self, job: _Job, client: NodeClient, started: float, error: str = "") -> None:
        """A node call's outcome: the node's stats and, when on, its metrics."""
        seconds = time.monotonic() - started
        client.record(not error, seconds, error)
        if self.metrics is None:
            return
        series = self.metrics.node(self.writable.name if job.node == WRITABLE else job.node)
        series.latency.observe(seconds)
        if error:
            series.errors += 1
        if job.attempt:
            series.retries += 1

    async def _reload(
        self,
        job: _Job,
        client: NodeClient,
        collection: str,
        stale: tuple[np.ndarray, np.ndarray],
        deadline: float,
        metadata: Metadata | None,
    ) -> str:
        """Reload files changed since this node last reloaded them; an error text, or "" when fine."""
        ids, times = stale
        request = pb.ReLoadSegmentsParam(collection_name=collection, segment_id_array=[str(i) for i in ids.tolist()])
        try:
            raw = await client.rpc("ReloadSegments")(
                request.SerializeToString(), timeout=self._timeout(job, deadline), metadata=metadata
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

    def _decode(self, job: _Job, payload: bytes, nq: int) -> tuple[np.ndarray, np.ndarray]:
        code, reason, row_num, ids, distances = wire.decode_topk_result(payload)
        if code != 0:
            raise MilvusError(reason, code)  # the node's own answer, e.g. a dimension mismatch
        if row_num == 0:
            return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
        if row_num != nq:
            raise UnexpectedError(f"read-only node {job.node} returned {row_num} rows for {nq} queries")
        return ids, distances

    def _failed(self, job: _Job, error: str) -> None:
        if job.node == WRITABLE:
            log.warning("writable node failed a search: %s", error)
        else:
            self.membership.mark_failed(job.node, error)
            self.reloads.forget(job.node)

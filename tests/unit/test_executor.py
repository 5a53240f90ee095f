"""The search executor (`search.Scatter`) over fake node ports on a virtual clock.

Every node is a `FakePort` (nodes.NodePort) that answers, fails or hangs as scripted; the event
loop's clock jumps straight to the next timer, so a test of a 5-second deadline takes
milliseconds and its timings are exact. The real Membership, NodeClient, ring router, planner,
tail-tolerance policy and accounting run unchanged.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable

import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from mishards.core.hedging import TailPolicy, TailTolerance
from mishards.core.planner import WRITABLE, Planner
from mishards.meta import FileSet
from mishards.nodes import HealthPolicy, Membership, NodeClient, NodeUnavailable, NodeUnimplemented
from mishards.observability.metrics import Metrics
from mishards.router import FileBasedHashRingRouter
from mishards.search import ReloadTracker, Scatter
from tests.support.fake_node import FakeNode
from tracer import Tracer
from utils.errors import ConnectFailed, NodeDeadline

FILES = FileSet([str(i) for i in range(1, 41)], np.zeros(40, dtype=np.int64))
SEARCH = pb.SearchParam(
    collection_name="c", query_record_array=[pb.RowRecord(float_data=[0.5, 0.5])], topk=5
).SerializeToString()
VERSION = pb.StringReply(string_reply="0.9.1").SerializeToString()
HANG = float("inf")


# ---------------------------------------------------------------------- a virtual clock
class _Selector:
    """Polls without waiting; when nothing is ready, the clock jumps by the timeout instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._inner = selectors.DefaultSelector()
        self._loop = loop

    def select(self, timeout: float | None = None):
        events = self._inner.select(0)
        if not events and timeout:
            self._loop.now += timeout
        return events

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(selector=_Selector(self))

    def time(self) -> float:
        return self.now


def run_virtual(scenario: Callable[[VirtualLoop], object]):
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


# ---------------------------------------------------------------------- fake nodes
class FakePort:
    """A node behind the node-call port: search replies after `delay` seconds (HANG: never), or
    `error` raised after `delay`; every call and every cancellation is recorded."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.delay = 0.01
        self.error: Exception | None = None
        self.searches: list[float] = []  # virtual start times
        self.cancelled = 0
        self.timeouts: list[float | None] = []
        self.enforce_timeouts = True  # as the real clients: NodeDeadline when the call's timeout passes
        self.fake = FakeNode()

    def call(self, path: str, request: bytes, timeout: float | None, metadata=None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        method = path.rpartition("/")[2]
        if method == "Cmd":
            future.set_result(VERSION)
            return future
        if method == "ReloadSegments":
            future.set_exception(NodeUnimplemented("a 0.9 node"))
            return future
        self.searches.append(loop.time())
        self.timeouts.append(timeout)
        future.add_done_callback(self._count_cancel)
        if timeout is not None and self.enforce_timeouts:
            loop.call_later(timeout, _settle, future, None, NodeDeadline("Deadline Exceeded"))
        if self.delay != HANG:
            reply = None if self.error is not None else self.fake.search_reply(request)
            loop.call_later(self.delay, _settle, future, reply, self.error)
        return future

    def _count_cancel(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.cancelled += 1

    def close(self) -> None:
        pass


def _settle(future: asyncio.Future, reply: bytes | None, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(reply)


class Cluster:
    """Read-only nodes ro-1..ro-N and a writable node, each a FakePort, and a Scatter over them."""

    def __init__(self, loop: VirtualLoop, readonly: int = 3, policy: TailPolicy | None = None, **scatter) -> None:
        def client(name: str, address: str) -> NodeClient:
            return NodeClient(name, address, port_factory=FakePort)

        self.writable = client("writable", "wo")
        self.membership = Membership(client_factory=client, health=HealthPolicy(interval_s=60), writable=self.writable)
        self.membership.attach(loop)
        self.metrics = Metrics()
        self.router = FileBasedHashRingRouter()
        policy = policy or TailPolicy(hedging=False)
        self.scatter = Scatter(
            membership=self.membership,
            writable=self.writable,
            router=self.router,
            tracer=Tracer(),
            reloads=ReloadTracker(),
            max_retry=3,
            metrics=self.metrics,
            tolerance=TailTolerance(policy),
            clock=loop.time,
            **scatter,
        )
        self.loop = loop
        self.names = [f"ro-{i}" for i in range(1, readonly + 1)]

    async def join(self) -> None:
        """Each node joins after its handshake, on a thread as discovery adds nodes (the call itself
        is handed back to this loop, over the node's own port)."""
        for name in self.names:
            assert await asyncio.to_thread(self.membership.add, name, name)

    def first_plan(self) -> dict[str, list[str]]:
        health = {n: c.stats.healthy for n, c in self.membership.all().items()}
        return Planner(self.router, 3).first(FILES.ids, health)

    def busiest(self) -> str:
        plan = self.first_plan()
        return max(plan, key=lambda n: len(plan[n]))

    async def search(self, seconds: float = 5.0) -> tuple[bytes, float]:
        started = self.loop.time()
        reply = await self.scatter.run("c", FILES, SEARCH, 1, 5, False, started + seconds)
        return reply, self.loop.time() - started

    def search_port(self, name: str) -> FakePort:
        """The port that carries the searches of `name` (the one opened on the loop, not the handshake's)."""
        return self.membership.get(name)._search_port if name != WRITABLE else self.writable._search_port


def rows(reply: bytes) -> int:
    return pb.TopKQueryResult.FromString(reply).row_num


# ---------------------------------------------------------------------- tests
def test_every_group_answered_once_without_failover():
    async def scenario(loop):
        cluster = Cluster(loop)
        await cluster.join()
        reply, took = await cluster.search()
        assert rows(reply) == 1
        plan = cluster.first_plan()
        for name in cluster.names:
            stats = cluster.membership.get(name).stats
            assert stats.calls == (1 if name in plan else 0) and stats.failovers == 0
            assert stats.files_routed == len(plan.get(name, []))
        assert took == pytest.approx(0.01)  # the nodes answered in parallel, in one node's time

    run_virtual(scenario)


def test_a_failing_node_fails_over_and_failovers_mean_the_same_in_conn_stats_and_prometheus():
    async def scenario(loop):
        cluster = Cluster(loop)
        await cluster.join()
        await cluster.search()  # opens each node's port
        doomed = cluster.busiest()
        cluster.search_port(doomed).error = NodeUnavailable("connection refused")
        reply, _ = await cluster.search()
        assert rows(reply) == 1  # complete: its files were answered elsewhere
        stats = cluster.membership.get(doomed).stats
        assert not stats.healthy and "connection refused" in stats.last_error
        assert stats.failovers == 1 == cluster.metrics.node(doomed).failovers
        assert stats.failures == 1 and cluster.metrics.node(doomed).errors == 1
        survivors = [n for n in cluster.names if n != doomed]
        assert sum(cluster.metrics.node(n).retries for n in survivors) >= 1
        assert all(cluster.membership.get(n).stats.failovers == 0 for n in survivors)

    run_virtual(scenario)


def test_every_read_only_node_failing_ends_on_the_writable_node():
    async def scenario(loop):
        cluster = Cluster(loop, readonly=2)
        await cluster.join()
        await cluster.search()
        for name in cluster.names:
            cluster.search_port(name).error = NodeUnavailable("down")
        reply, _ = await cluster.search()
        assert rows(reply) == 1
        assert cluster.writable.stats.calls >= 1 and cluster.writable.stats.files_routed == len(FILES)

    run_virtual(scenario)


def test_a_hung_node_is_cut_at_the_deadline_exactly_and_its_call_cancelled():
    async def scenario(loop):
        cluster = Cluster(loop, readonly=1, policy=TailPolicy(hedging=False, min_attempt_timeout_s=60))
        await cluster.join()
        await cluster.search()
        cluster.search_port("ro-1").delay = HANG
        cluster.search_port("ro-1").enforce_timeouts = False  # only the executor's deadline can end it
        with pytest.raises(ConnectFailed, match="the deadline passed"):
            await cluster.search(seconds=2.0)
        await asyncio.sleep(0)  # done-callbacks (the fake's cancel count) run on the next turn
        assert cluster.loop.time() - cluster.search_port("ro-1").searches[-1] == pytest.approx(2.0)
        assert cluster.search_port("ro-1").cancelled == 1
        assert cluster.search_port("ro-1").timeouts[-1] == pytest.approx(2.0)  # the call's own deadline: the request's
        assert cluster.writable.stats.calls == 0

    run_virtual(scenario)


def test_a_node_timeout_shorter_than_the_deadline_fails_over_and_counts_as_slow():
    async def scenario(loop):
        policy = TailPolicy(hedging=False, min_attempt_timeout_s=1.0, ejection_threshold=3)
        cluster = Cluster(loop, readonly=2, policy=policy)
        await cluster.join()
        await cluster.search()
        slow = cluster.busiest()
        cluster.search_port(slow).delay = HANG
        reply, took = await cluster.search(seconds=10.0)
        assert rows(reply) == 1
        assert took == pytest.approx(1.0 + 0.01)  # its 1 s attempt timeout, then the other node's answer
        stats = cluster.membership.get(slow).stats
        assert stats.healthy, "a timeout alone is not a failure: the node is slow, not down"
        assert stats.failovers == 1 == cluster.metrics.node(slow).failovers

    run_virtual(scenario)


def test_a_slow_call_is_hedged_and_the_loser_cancelled():
    async def scenario(loop):
        policy = TailPolicy(min_delay_s=0.05, max_delay_s=0.2, min_samples=1_000, min_attempt_timeout_s=5.0)
        cluster = Cluster(loop, readonly=3, policy=policy)
        await cluster.join()
        await cluster.search()
        slow = cluster.busiest()
        cluster.search_port(slow).delay = HANG
        reply, took = await cluster.search()
        await asyncio.sleep(0)
        assert rows(reply) == 1
        assert took == pytest.approx(0.2 + 0.01)  # hedged at the cap (too few samples), answered at once
        assert cluster.search_port(slow).cancelled == 1
        assert sum(cluster.membership.get(n).stats.hedges_won for n in cluster.names) == 1
        assert sum(cluster.metrics.node(n).hedges for n in cluster.names) == 1
        assert cluster.writable.stats.calls == 0

    run_virtual(scenario)


def test_a_cancelled_search_cancels_every_call_in_flight():
    async def scenario(loop):
        cluster = Cluster(loop, readonly=3, policy=TailPolicy(hedging=False, min_attempt_timeout_s=60))
        await cluster.join()
        await cluster.search()
        for name in cluster.names:
            cluster.search_port(name).delay = HANG
        task = asyncio.ensure_future(cluster.search())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        in_flight = len(cluster.first_plan())
        assert sum(cluster.search_port(n).cancelled for n in cluster.names) == in_flight

    run_virtual(scenario)


def test_partial_results_answer_before_the_deadline_with_what_arrived():
    async def scenario(loop):
        policy = TailPolicy(hedging=False, min_attempt_timeout_s=60)
        cluster = Cluster(loop, readonly=3, policy=policy, partial_results=True)
        await cluster.join()
        await cluster.search()
        slow = cluster.busiest()
        cluster.search_port(slow).delay = HANG
        cluster.search_port(slow).enforce_timeouts = False
        reply, took = await cluster.search(seconds=2.0)
        status = pb.TopKQueryResult.FromString(reply).status
        assert status.error_code == 0 and "partial result" in status.reason
        assert took == pytest.approx(2.0 - 0.2)  # stops a share of the time before the deadline
        assert cluster.metrics.partial_searches == 1

    run_virtual(scenario)


def test_a_node_that_leaves_during_a_search_fails_over_without_being_recorded():
    async def scenario(loop):
        cluster = Cluster(loop, readonly=2)
        await cluster.join()
        await cluster.search()
        gone = cluster.busiest()
        client = cluster.membership.get(gone)
        cluster.membership.remove(gone)
        reply, _ = await cluster.search()
        assert rows(reply) == 1
        assert client.stats.calls == 1  # the first search only

    run_virtual(scenario)

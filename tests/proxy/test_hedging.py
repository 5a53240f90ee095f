"""The search path's hedging and ejection over real gRPC: scripted in-process nodes that answer at
once or hang, the real Membership, NodeClients (both transports), ring router and Scatter."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from milvus_grpc import milvus_pb2 as pb
from mishards.core.hedging import TailPolicy, TailTolerance
from mishards.meta import FileSet
from mishards.nodes import HealthPolicy, Membership, NodeClient
from mishards.router import FileBasedHashRingRouter
from mishards.search import ReloadTracker, Scatter
from tests.support.fake_node import FakeNode
from tests.support.processes import free_port
from tracer import Tracer
from utils.errors import ConnectFailed
from utils.milvus_schema import SERVICE

HANG_S = 20.0  # a hung node's calls: released at teardown, long past any deadline here
FILES = FileSet([str(i) for i in range(1, 41)], np.zeros(40, dtype=np.int64))
SEARCH = pb.SearchParam(
    collection_name="c",
    query_record_array=[pb.RowRecord(float_data=[0.5, 0.5])],
    topk=5,
    extra_params=[pb.KeyValuePair(key="params", value="{}")],
).SerializeToString()


class ScriptedNode:
    """A node on a real grpc server: answers SearchInFiles at once, or hangs while `hung` is set."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.hung = threading.Event()
        self.released = threading.Event()
        self.searches = 0
        fake = FakeNode()

        def search(request: bytes, context) -> bytes:
            self.searches += 1
            if self.hung.is_set():
                self.released.wait(HANG_S)
            return fake.search_reply(request)

        def version(request: bytes, context) -> bytes:
            return pb.StringReply(string_reply="0.9.1").SerializeToString()

        def reload(request: bytes, context) -> bytes:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "0.9")

        handlers = {
            "SearchInFiles": grpc.unary_unary_rpc_method_handler(search),
            "Cmd": grpc.unary_unary_rpc_method_handler(version),
            "ReloadSegments": grpc.unary_unary_rpc_method_handler(reload),
        }
        self.server = grpc.server(
            ThreadPoolExecutor(8), handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)]
        )
        self.server.add_insecure_port(self.address)
        self.server.start()

    def stop(self) -> None:
        self.released.set()
        self.server.stop(grace=None)


@pytest.fixture
def nodes():
    started: list[ScriptedNode] = []

    def make(count: int) -> list[ScriptedNode]:
        started.extend(ScriptedNode() for _ in range(count))
        return started[-count:]

    yield make
    for node in started:
        node.stop()


def scatter_over(readonly: list[ScriptedNode], writable: ScriptedNode, policy: TailPolicy, transport: str):
    fast = transport == "http2"
    writable_client = NodeClient("writable", writable.address, fast_transport=fast)
    membership = Membership(
        client_factory=lambda name, address: NodeClient(name, address, fast_transport=fast),
        health=HealthPolicy(interval_s=60),  # no background checks: ejection alone takes nodes out
        writable=writable_client,
    )
    for node in readonly:
        assert membership.add(node.address, node.address)
    scatter = Scatter(
        membership=membership,
        writable=writable_client,
        router=FileBasedHashRingRouter(),
        tracer=Tracer(),
        reloads=ReloadTracker(),
        max_retry=3,
        tolerance=TailTolerance(policy),
    )
    return scatter, membership


def run(membership: Membership, scenario):
    """Run the scenario on a fresh loop; close the node clients on that loop before it ends."""

    async def main():
        try:
            return await scenario
        finally:
            membership.stop()
            membership.writable.close()
            await asyncio.sleep(0.05)

    return asyncio.run(main())


async def search(scatter: Scatter, seconds: float = 10.0) -> float:
    started = time.monotonic()
    await scatter.run("c", FILES, SEARCH, 1, 5, False, time.monotonic() + seconds)
    return time.monotonic() - started


def busiest(readonly: list[ScriptedNode]) -> ScriptedNode:
    groups = FileBasedHashRingRouter().assign(FILES.ids, [n.address for n in readonly])
    return next(n for n in readonly if n.address == max(groups, key=lambda a: len(groups[a])))


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_a_hung_node_is_hedged_on_a_readonly_node_then_ejected(nodes, transport):
    *readonly, writable = nodes(4)
    policy = TailPolicy(min_delay_s=0.05, max_delay_s=0.2, min_attempt_timeout_s=5.0, ejection_threshold=3)
    scatter, membership = scatter_over(readonly, writable, policy, transport)
    victim = busiest(readonly)
    clients = membership.all()  # stop() forgets them

    async def scenario() -> list[float]:
        for _ in range(15):  # latency samples: the hedge delay drops to the floor
            await search(scatter)
        victim.hung.set()
        return [await search(scatter) for _ in range(5)]

    latencies = run(membership, scenario())
    assert max(latencies) < 1.0, latencies  # not the 5 s call timeout
    assert writable.searches == 0, "hedges never go to the writable node while a read-only node is left"
    stats = clients[victim.address].stats
    # three lost hedges in a row ejected it: the searches after that did not reach it
    assert not stats.healthy and stats.ejections == 1 and "lost a hedge" in stats.last_error
    assert victim.searches == 15 + 3
    assert sum(c.stats.hedges_won for c in clients.values()) == 3


def test_a_hung_last_readonly_node_is_hedged_on_the_writable_node(nodes):
    only, writable = nodes(2)
    scatter, membership = scatter_over(
        [only], writable, TailPolicy(max_delay_s=0.1, min_attempt_timeout_s=5.0), "http2"
    )
    only.hung.set()
    elapsed = run(membership, search(scatter))
    assert elapsed < 1.0 and writable.searches == 1


def test_the_budget_caps_hedges_then_the_nodes_own_timeout_applies(nodes):
    *readonly, writable = nodes(3)
    policy = TailPolicy(
        max_delay_s=0.05, budget_ratio=0.0, budget_burst=1.0, min_attempt_timeout_s=0.6, ejection_threshold=100
    )
    scatter, membership = scatter_over(readonly, writable, policy, "http2")
    victim = busiest(readonly)
    victim.hung.set()

    async def scenario() -> list[float]:
        return [await search(scatter) for _ in range(2)]

    first, second = run(membership, scenario())
    assert first < 0.5, "the one token paid for a hedge"
    assert 0.6 <= second < 2.0, "no token left: the call ran to its own timeout, then failed over"
    assert scatter.tolerance.hedges == 1 and scatter.tolerance.hedges_refused >= 1


def test_hedging_off_waits_for_the_calls_timeout(nodes):
    *readonly, writable = nodes(3)
    policy = TailPolicy(hedging=False, min_attempt_timeout_s=0.6, ejection_threshold=100)
    scatter, membership = scatter_over(readonly, writable, policy, "http2")
    busiest(readonly).hung.set()
    elapsed = run(membership, search(scatter))
    assert 0.6 <= elapsed < 2.0 and scatter.tolerance.hedges == 0


def test_every_node_hung_the_error_names_the_files_and_nodes(nodes):
    only, writable = nodes(2)
    scatter, membership = scatter_over([only], writable, TailPolicy(min_attempt_timeout_s=0.3), "http2")
    only.hung.set()
    writable.hung.set()
    with pytest.raises(ConnectFailed) as failure:
        run(membership, search(scatter, seconds=1.0))
    message = str(failure.value)
    assert "no node could search 40 file(s)" in message and "files 1, 2, 3" in message
    assert only.address in message and writable.address in message

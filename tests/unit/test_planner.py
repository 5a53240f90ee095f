"""The planner (mishards/core/planner.py) with plain inputs: no node, no DB, no clock."""

from __future__ import annotations

import pytest

from mishards.core.planner import WRITABLE, Planner
from mishards.router import FileBasedHashRingRouter

FILES = [str(i) for i in range(1, 61)]
NODES = {"ro-1": True, "ro-2": True, "ro-3": True}


@pytest.fixture
def planner() -> Planner:
    return Planner(FileBasedHashRingRouter(), max_retry=3)


def owners(planner: Planner, nodes: dict[str, bool]) -> dict[str, str]:
    return {file_id: node for node, ids in planner.first(FILES, nodes).items() for file_id in ids}


def test_nothing_flushed_is_one_unsplit_search_on_the_writable_node(planner):
    assert Planner.unsplit(0)
    assert not Planner.unsplit(1)


def test_first_plan_covers_every_file_once_on_the_healthy_nodes(planner):
    plan = planner.first(FILES, NODES)
    assert sorted(f for ids in plan.values() for f in ids) == sorted(FILES)
    assert set(plan) <= set(NODES) and len(plan) > 1  # 60 files spread over more than one node


def test_an_unhealthy_node_gets_nothing_and_only_its_files_move(planner):
    before = owners(planner, NODES)
    after = owners(planner, {**NODES, "ro-2": False})
    assert "ro-2" not in set(after.values())
    moved = {f for f in FILES if before[f] != after[f]}
    assert moved == {f for f in FILES if before[f] == "ro-2"}  # the ring keeps the others where they were


def test_no_healthy_read_only_node_puts_every_file_on_the_writable_node(planner):
    assert planner.first(FILES, {"ro-1": False}) == {WRITABLE: FILES}
    assert planner.first(FILES, {}) == {WRITABLE: FILES}


def test_reroute_never_sends_files_back_to_a_node_that_failed_them(planner):
    plan = planner.first(FILES, NODES)
    failed = max(plan, key=lambda n: len(plan[n]))
    regrouped = planner.reroute(plan[failed], NODES, {failed})
    assert failed not in regrouped and WRITABLE not in regrouped
    assert sorted(f for ids in regrouped.values() for f in ids) == sorted(plan[failed])


def test_reroute_falls_back_to_the_writable_node_then_gives_up(planner):
    assert planner.reroute(FILES[:5], NODES, {"ro-1", "ro-2", "ro-3"}) == {WRITABLE: FILES[:5]}
    assert planner.reroute(FILES[:5], NODES, {"ro-1", WRITABLE}) is None


def test_max_retry_caps_the_read_only_nodes_tried(planner):
    two = Planner(FileBasedHashRingRouter(), max_retry=2)
    assert two.reroute(FILES[:5], NODES, {"ro-1", "ro-2"}) == {WRITABLE: FILES[:5]}  # ro-3 is left, but 2 were tried
    assert WRITABLE not in planner.reroute(FILES[:5], NODES, {"ro-1", "ro-2"})


def test_hedge_target_is_a_read_only_node_while_one_is_left(planner):
    plan = planner.first(FILES, NODES)
    slow = max(plan, key=lambda n: len(plan[n]))
    target = planner.hedge_target(plan[slow], NODES, {slow})
    assert target in NODES and target != slow


def test_hedge_goes_to_the_writable_node_only_when_no_read_only_node_is_left(planner):
    assert planner.hedge_target(FILES[:5], {"ro-1": True}, {"ro-1"}) == WRITABLE
    assert planner.hedge_target(FILES[:5], {"ro-1": True}, {"ro-1", WRITABLE}) is None
    # ro-2 is healthy and untried but MAX_RETRY=1 excludes it: no hedge at all, never the writable node
    one = Planner(FileBasedHashRingRouter(), max_retry=1)
    assert one.hedge_target(FILES[:5], {"ro-1": True, "ro-2": True}, {"ro-1"}) is None

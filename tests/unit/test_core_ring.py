"""The file hash ring against an independent rebuild of the original ketama layout.

The oracle follows docs/semantics.md ("The hash ring") literally (md5 of "<node>-<j>" for 40 points,
3 little-endian keys per digest, bisect-right lookup with wrap-around), without uhashring, so these
tests pin down both the batched lookups and compatibility with the original assignment.
"""

from __future__ import annotations

import bisect
import hashlib
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mishards.core.ring import ConsistentHashRing, RingCache
from utils.errors import NoAvailableNode


def original_ring(nodes: list[str]) -> tuple[list[int], dict[int, str]]:
    """The original's continuum: 40 points per node, 3 ring keys per point."""
    owner_of_key: dict[int, str] = {}
    for node in nodes:
        for point in range(40):
            digest = hashlib.md5(f"{node}-{point}".encode()).digest()
            for offset in (0, 4, 8):
                owner_of_key[int.from_bytes(digest[offset : offset + 4], "little")] = node
    return sorted(owner_of_key), owner_of_key


def original_walk(nodes: list[str], file_id: str) -> list[str]:
    """Distinct nodes met walking the original ring from the file's position (owner first)."""
    keys, owner_of_key = original_ring(nodes)
    position = int.from_bytes(hashlib.md5(file_id.encode()).digest()[:4], "little")
    start = bisect.bisect_right(keys, position)
    walk: list[str] = []
    for key in keys[start:] + keys[:start]:
        if owner_of_key[key] not in walk:
            walk.append(owner_of_key[key])
    return walk


node_names = st.one_of(
    st.builds(
        lambda a, b, port: f"10.{a}.{b}.1:{port}", st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)
    ),
    st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20),
)
node_sets = st.lists(node_names, min_size=1, max_size=10, unique=True)
file_id_lists = st.lists(st.integers(0, 10**12).map(str), min_size=0, max_size=60, unique=True)


@settings(max_examples=60, deadline=None)
@given(nodes=node_sets, file_ids=file_id_lists)
def test_every_file_goes_to_exactly_one_node_as_the_original_ring_would(nodes, file_ids):
    groups = ConsistentHashRing(nodes).assign(file_ids)

    assert all(groups.values()), "no empty group"
    assert set(groups) <= set(nodes)
    routed = [file_id for group in groups.values() for file_id in group]
    assert sorted(routed) == sorted(file_ids)
    for node, group in groups.items():
        assert group == [file_id for file_id in file_ids if file_id in set(group)], "input order kept"
        for file_id in group:
            assert original_walk(nodes, file_id)[0] == node


@settings(max_examples=40, deadline=None)
@given(nodes=node_sets, file_ids=file_id_lists, data=st.data())
def test_excluded_nodes_hand_their_files_to_the_next_node_of_the_walk(nodes, file_ids, data):
    excluded = set(data.draw(st.lists(st.sampled_from(nodes), max_size=len(nodes) - 1)))
    ring = ConsistentHashRing(nodes)

    groups = ring.assign(file_ids, excluded)

    assert not excluded & set(groups)
    for node, group in groups.items():
        for file_id in group:
            assert next(n for n in original_walk(nodes, file_id) if n not in excluded) == node
    # With equal weights, failing over is the same as dropping the nodes from the ring: the
    # files a dead node served land where they will stay once it is removed from membership.
    assert groups == ConsistentHashRing(set(nodes) - excluded).assign(file_ids)


@pytest.mark.parametrize("node_count", range(2, 11))
def test_removing_or_adding_one_node_moves_only_about_one_nth_of_the_files(node_count):
    file_ids = [str(file_id) for file_id in range(100_000, 102_000)]
    nodes = [f"192.168.{node_count}.{index}:19530" for index in range(node_count)]
    before = _owner_of(ConsistentHashRing(nodes).assign(file_ids))

    removed = nodes[node_count // 2]
    after_removal = _owner_of(ConsistentHashRing(set(nodes) - {removed}).assign(file_ids))
    moved = {file_id for file_id in file_ids if before[file_id] != after_removal[file_id]}
    assert moved == {file_id for file_id in file_ids if before[file_id] == removed}
    assert 0.4 / node_count <= len(moved) / len(file_ids) <= 2.0 / node_count

    added = "192.168.99.99:19530"
    after_addition = _owner_of(ConsistentHashRing([*nodes, added]).assign(file_ids))
    moved = {file_id for file_id in file_ids if before[file_id] != after_addition[file_id]}
    assert all(after_addition[file_id] == added for file_id in moved)
    assert 0.4 / (node_count + 1) <= len(moved) / len(file_ids) <= 2.0 / (node_count + 1)


def _owner_of(groups: dict[str, list[str]]) -> dict[str, str]:
    return {file_id: node for node, group in groups.items() for file_id in group}


def test_an_empty_ring_routes_nothing_and_refuses_files():
    ring = ConsistentHashRing([])

    assert ring.assign([]) == {}
    with pytest.raises(NoAvailableNode):
        ring.assign(["7"])


def test_excluding_every_node_is_a_clear_error():
    ring = ConsistentHashRing(["a:1", "b:2"])

    with pytest.raises(NoAvailableNode) as raised:
        ring.assign(["1", "2"], excluded={"a:1", "b:2"})
    assert raised.value.code == 1  # UNEXPECTED_ERROR, as the original's "Conn Group is Empty"


def test_unknown_excluded_names_are_ignored():
    ring = ConsistentHashRing(["a:1", "b:2"])
    files = [str(file_id) for file_id in range(50)]

    assert ring.assign(files, excluded={"gone:3"}) == ring.assign(files)


def test_the_cache_rebuilds_only_when_the_membership_changes():
    cache = RingCache()

    first = cache.ring_for(["a:1", "b:2"])
    assert cache.ring_for(("b:2", "a:1")) is first
    second = cache.ring_for(["a:1", "b:2", "c:3"])
    assert second is not first
    assert second.nodes == {"a:1", "b:2", "c:3"}
    assert cache.ring_for(["a:1", "b:2", "c:3"]) is second


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.sets(st.from_regex(r"10\.0\.[0-9]{1,2}\.[0-9]{1,2}:19530", fullmatch=True), min_size=1, max_size=8),
    files=st.lists(st.integers(1, 10**9).map(str), min_size=1, max_size=48),
)
def test_small_assignment_path_equals_the_vectorised_one(nodes, files):
    from mishards.core import ring as ring_module

    ring = ring_module.ConsistentHashRing(nodes)
    small = ring.assign(files)
    saved = ring_module.SMALL_ASSIGN
    ring_module.SMALL_ASSIGN = 0
    try:
        assert ring.assign(files) == small
    finally:
        ring_module.SMALL_ASSIGN = saved

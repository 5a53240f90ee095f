"""The 0.10 reload-on-update bookkeeping: reload on first sight and after a change, per node, bounded."""

from __future__ import annotations

import numpy as np

from mishards.search import ReloadTracker


def test_first_sight_and_changes_need_a_reload_per_node():
    tracker = ReloadTracker()
    ids, times = np.array([7, 3, 11]), np.array([100, 200, 300])
    assert tracker.stale("a", ids, times).all(), "a node may hold stale cached copies from before"
    tracker.record("a", ids, times)
    assert not tracker.stale("a", ids, times).any()
    assert tracker.stale("b", ids, times).all(), "per node"
    assert tracker.stale("a", ids, np.array([100, 201, 300])).tolist() == [False, True, False]
    assert tracker.stale("a", np.array([5]), np.array([1])).tolist() == [True], "an unknown file"


def test_recording_keeps_the_newest_time_and_forget_drops_a_node():
    tracker = ReloadTracker()
    tracker.record("a", np.array([1, 2]), np.array([10, 10]))
    tracker.record("a", np.array([2, 3]), np.array([20, 5]))
    assert tracker.stale("a", np.array([1, 2, 3]), np.array([10, 20, 5])).tolist() == [False, False, False]
    assert tracker.stale("a", np.array([2]), np.array([21])).tolist() == [True]
    tracker.forget("a")
    assert tracker.stale("a", np.array([1]), np.array([10])).tolist() == [True]


def test_state_is_bounded(monkeypatch):
    monkeypatch.setattr(ReloadTracker, "MAX_FILES_PER_NODE", 4)
    tracker = ReloadTracker()
    tracker.record("a", np.arange(3), np.ones(3, np.int64))
    tracker.record("a", np.arange(3, 6), np.ones(3, np.int64))
    assert not tracker.stale("a", np.arange(3, 6), np.ones(3, np.int64)).any()
    assert tracker.stale("a", np.arange(3), np.ones(3, np.int64)).all(), "old entries were dropped: cost is a reload"

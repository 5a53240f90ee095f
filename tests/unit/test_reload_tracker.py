"""The 0.10 reload-on-update bookkeeping: reload on first sight and after a change, per node, bounded."""

from __future__ import annotations

from mishards.search import ReloadTracker


def test_first_sight_and_changes_need_a_reload_per_node():
    tracker = ReloadTracker()
    times = {"7": 100, "3": 200, "11": 300}
    assert tracker.stale("a", ["7", "3", "11"], times) == ["7", "3", "11"], "a node may hold stale cached copies"
    tracker.record("a", ["7", "3", "11"], times)
    assert tracker.stale("a", ["7", "3", "11"], times) == []
    assert tracker.stale("b", ["7", "3", "11"], times) == ["7", "3", "11"], "per node"
    assert tracker.stale("a", ["7", "3", "11"], {"7": 100, "3": 201, "11": 300}) == ["3"]
    assert tracker.stale("a", ["5"], {"5": 1}) == ["5"], "an unknown file"


def test_recording_keeps_the_newest_time_and_forget_drops_a_node():
    tracker = ReloadTracker()
    tracker.record("a", ["1", "2"], {"1": 10, "2": 10})
    tracker.record("a", ["2", "3"], {"2": 20, "3": 5})
    tracker.record("a", ["2"], {"2": 15})  # an older answer arriving late does not roll the time back
    assert tracker.stale("a", ["1", "2", "3"], {"1": 10, "2": 20, "3": 5}) == []
    assert tracker.stale("a", ["2"], {"2": 21}) == ["2"]
    tracker.forget("a")
    assert tracker.stale("a", ["1"], {"1": 10}) == ["1"]


def test_state_is_bounded(monkeypatch):
    monkeypatch.setattr(ReloadTracker, "MAX_FILES_PER_NODE", 4)
    tracker = ReloadTracker()
    old, new = ["0", "1", "2"], ["3", "4", "5"]
    times = dict.fromkeys(old + new, 1)
    tracker.record("a", old, times)
    tracker.record("a", new, times)
    assert tracker.stale("a", new, times) == []
    assert tracker.stale("a", old, times) == old, "old entries were dropped: the cost is a reload"

"""The tail-tolerance policy (mishards/core/hedging.py) on a fake clock: delays, budget, timeouts, ejection."""

from __future__ import annotations

import pytest

from mishards.core.hedging import RECOMPUTE_AFTER_S, HedgeBudget, TailPolicy, TailTolerance


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def feed(policy: TailTolerance, clock: FakeClock, node: str, latencies: list[float]) -> None:
    for seconds in latencies:
        policy.answered(node, clock.advance(0.01), seconds)


def test_without_enough_samples_the_delay_is_the_cap() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(min_samples=10, max_delay_s=0.5))
    assert tail.hedge_delay("a", clock.now) == 0.5
    feed(tail, clock, "a", [0.01] * 9)
    assert tail.hedge_delay("a", clock.advance(RECOMPUTE_AFTER_S)) == 0.5


def test_delay_is_the_nodes_percentile_within_floor_and_cap() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(delay_percentile=90, min_delay_s=0.02, max_delay_s=0.5, min_samples=5))
    feed(tail, clock, "fast", [0.030] * 90 + [0.200] * 10)
    feed(tail, clock, "tiny", [0.001] * 100)
    feed(tail, clock, "slow", [2.0] * 100)
    now = clock.advance(RECOMPUTE_AFTER_S)
    assert tail.hedge_delay("fast", now) == pytest.approx(0.030 + 0.1 * 0.170, rel=0.05)  # interpolated p90
    assert tail.hedge_delay("tiny", now) == 0.02  # the floor
    assert tail.hedge_delay("slow", now) == 0.5  # the cap
    assert tail.hedge_delay("unknown", now) == 0.5


def test_the_estimate_follows_a_change_as_old_samples_expire() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(window_s=10, min_samples=5, min_delay_s=0.0, max_delay_s=5))
    feed(tail, clock, "a", [0.4] * 50)
    assert tail.hedge_delay("a", clock.advance(RECOMPUTE_AFTER_S)) == pytest.approx(0.4)
    clock.advance(11)  # the slow phase is over and forgotten
    feed(tail, clock, "a", [0.01] * 20)
    assert tail.hedge_delay("a", clock.advance(RECOMPUTE_AFTER_S)) == pytest.approx(0.01)


def test_budget_caps_hedges_at_the_ratio_of_first_calls_after_the_burst() -> None:
    tail = TailTolerance(TailPolicy(budget_ratio=0.1, budget_burst=10))
    hedged = 0
    for _ in range(2000):  # every call would like a hedge: only the burst plus 10% get one
        tail.first_call()
        hedged += tail.may_hedge()
    assert hedged <= 10 + 0.1 * 2000
    assert hedged >= 0.1 * 2000 - 1
    assert tail.hedges == hedged and tail.hedges_refused == 2000 - hedged


def test_budget_spends_whole_tokens_only() -> None:
    budget = HedgeBudget(ratio=0.5, burst=1.5)
    assert budget.spend() and not budget.spend()  # 0.5 left
    budget.deposit()
    assert budget.spend()
    for _ in range(10):
        budget.deposit()
    assert budget.tokens == 1.5


def test_hedging_off_sends_no_hedge() -> None:
    tail = TailTolerance(TailPolicy(hedging=False))
    tail.first_call()
    assert not tail.may_hedge()


def test_attempt_timeout_follows_the_nodes_p99_with_a_floor_and_grows_per_attempt() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(timeout_factor=10, min_attempt_timeout_s=1.0, min_samples=5))
    assert tail.attempt_timeout("new", clock.now) == 1.0
    feed(tail, clock, "a", [0.5] * 100)
    feed(tail, clock, "b", [0.01] * 100)
    now = clock.advance(RECOMPUTE_AFTER_S)
    assert tail.attempt_timeout("a", now) == pytest.approx(5.0)
    assert tail.attempt_timeout("b", now) == 1.0
    assert tail.attempt_timeout("b", now, attempt=2) == 4.0


def test_ejection_after_consecutive_slow_calls_and_an_answer_resets_the_streak() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(ejection_threshold=3, max_ejected_share=0.5))
    assert not tail.slow("a", ejected=0, total=3)
    assert not tail.slow("a", ejected=0, total=3)
    tail.answered("a", clock.now, 0.01)
    assert tail.streak("a") == 0
    assert not tail.slow("a", ejected=0, total=3)
    assert not tail.slow("a", ejected=0, total=3)
    assert tail.slow("a", ejected=0, total=3)
    assert tail.streak("a") == 0, "the streak starts over after an ejection"


def test_ejection_never_takes_out_more_than_the_share_but_always_allows_one() -> None:
    tail = TailTolerance(TailPolicy(ejection_threshold=1, max_ejected_share=0.5))
    assert tail.slow("a", ejected=0, total=3)  # floor(1.5) = 1 may be out
    assert not tail.slow("b", ejected=1, total=3)
    assert tail.slow("b", ejected=1, total=4)  # 2 of 4
    assert tail.slow("c", ejected=0, total=2)
    assert not tail.slow("d", ejected=0, total=1), "the only node is never ejected"
    tail = TailTolerance(TailPolicy(ejection_threshold=1, max_ejected_share=0.0))
    assert tail.slow("a", ejected=0, total=5), "a share of 0 still lets one node go, as Envoy does"


def test_forget_drops_a_nodes_history() -> None:
    clock = FakeClock()
    tail = TailTolerance(TailPolicy(min_samples=5, max_delay_s=0.5, min_delay_s=0.0))
    feed(tail, clock, "a", [0.01] * 50)
    tail.slow("a", 0, 3)
    tail.forget("a")
    assert tail.streak("a") == 0
    assert tail.hedge_delay("a", clock.advance(RECOMPUTE_AFTER_S)) == 0.5

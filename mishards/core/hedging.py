"""Tail tolerance policy: when a node call is hedged, how long one attempt may take, when a node is ejected.

Pure and I/O-free: every decision takes the current time (`now`, monotonic seconds) as an
argument, so tests drive it with a fake clock and the search path stays a thin adapter.

- Hedge delay, per node: a high percentile (HEDGE_DELAY_PERCENTILE) of that node's recent call
  latencies (the last `window_s` seconds, at most WINDOW_SAMPLES calls), kept between
  HEDGE_MIN_DELAY and HEDGE_MAX_DELAY. A node with too few samples gets the cap: we do not hedge
  early on a guess.
- Budget: a token bucket in the manner of gRPC's retry throttling. Every first call of a file
  group deposits `budget_ratio` tokens (up to `budget_burst`); a hedge spends one token, and
  none is sent without one. Over any long stretch hedges stay below `budget_ratio` of the calls,
  so hedging cannot double the load of a cluster that is slow because it is overloaded.
- Attempt timeout, per node: `timeout_factor` x the node's observed p99 (at least
  `min_attempt_timeout_s`), doubled for each earlier attempt of the same files, so one heavy
  query does not time out everywhere; the caller caps it by its own deadline.
- Ejection, as Envoy's consecutive-failure outlier detection: a node whose calls time out or lose
  a hedge `ejection_threshold` times in a row leaves routing at once, unless that would put more
  than `max_ejected_share` of the nodes out (the health checks still remove a dead node, and
  bring an ejected one back).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOW_SAMPLES = 256
"""Latencies kept per node: enough for a stable p99, few enough to follow a change within seconds."""

RECOMPUTE_EVERY = 16
"""New samples after which a node's percentiles are recomputed (each recompute is one numpy call)."""

RECOMPUTE_AFTER_S = 1.0
"""Percentiles older than this are recomputed even without new samples (old samples expire)."""


@dataclass(frozen=True)
class TailPolicy:
    """The knobs (HEDGE_* settings); the defaults are the shipped ones."""

    hedging: bool = True
    delay_percentile: float = 95.0
    min_delay_s: float = 0.05
    max_delay_s: float = 0.5
    budget_ratio: float = 0.10
    budget_burst: float = 10.0
    window_s: float = 30.0
    min_samples: int = 10
    timeout_factor: float = 10.0
    min_attempt_timeout_s: float = 5.0
    ejection_threshold: int = 3
    max_ejected_share: float = 0.5


class LatencyWindow:
    """One node's recent call latencies (seconds) with cached percentiles."""

    __slots__ = ("max_age_s", "_samples", "_fresh", "_computed_at", "_percentiles", "_quantiles")

    def __init__(self, max_age_s: float, quantiles: tuple[float, ...]) -> None:
        self.max_age_s = max_age_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=WINDOW_SAMPLES)
        self._quantiles = quantiles
        self._fresh = 0  # samples added since the last recompute
        self._computed_at = -math.inf
        self._percentiles: tuple[float, ...] | None = None

    def add(self, now: float, seconds: float) -> None:
        self._samples.append((now, seconds))
        self._fresh += 1

    def __len__(self) -> int:
        return len(self._samples)

    def percentiles(self, now: float, min_samples: int) -> tuple[float, ...] | None:
        """The configured percentiles of the samples younger than max_age_s; None with too few."""
        if self._fresh >= RECOMPUTE_EVERY or now - self._computed_at >= RECOMPUTE_AFTER_S or self._percentiles is None:
            oldest = now - self.max_age_s
            while self._samples and self._samples[0][0] < oldest:
                self._samples.popleft()
            self._fresh = 0
            self._computed_at = now
            if len(self._samples) < max(min_samples, 1):
                self._percentiles = None
            else:
                values = np.fromiter((s for _, s in self._samples), dtype=np.float64, count=len(self._samples))
                self._percentiles = tuple(np.percentile(values, self._quantiles).tolist())
        return self._percentiles


class HedgeBudget:
    """Tokens for hedges: `ratio` per first call, one per hedge, at most `burst` saved up."""

    __slots__ = ("ratio", "burst", "tokens")

    def __init__(self, ratio: float, burst: float) -> None:
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def deposit(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def spend(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TailTolerance:
    """Per-node latency, the shared hedge budget and the consecutive-slowness streaks."""

    def __init__(self, policy: TailPolicy = TailPolicy()) -> None:
        self.policy = policy
        self.budget = HedgeBudget(policy.budget_ratio, policy.budget_burst)
        self._latency: dict[str, LatencyWindow] = {}
        self._streak: dict[str, int] = {}
        self.first_calls = 0
        self.hedges = 0
        self.hedges_refused = 0

    def _window(self, node: str) -> LatencyWindow:
        window = self._latency.get(node)
        if window is None:
            window = self._latency[node] = LatencyWindow(self.policy.window_s, (self.policy.delay_percentile, 99.0))
        return window

    # ------------------------------------------------------------------ decisions
    def hedge_delay(self, node: str, now: float) -> float:
        """Seconds to wait for `node` before hedging its call."""
        p = self.policy
        estimate = self._window(node).percentiles(now, p.min_samples)
        if estimate is None:
            return p.max_delay_s
        return min(max(estimate[0], p.min_delay_s), p.max_delay_s)

    def attempt_timeout(self, node: str, now: float, attempt: int = 0) -> float:
        """Seconds one call to `node` may take before it counts as timed out (uncapped by any deadline)."""
        p = self.policy
        estimate = self._window(node).percentiles(now, p.min_samples)
        base = (
            p.min_attempt_timeout_s
            if estimate is None
            else max(p.min_attempt_timeout_s, p.timeout_factor * estimate[1])
        )
        return base * (2 ** min(attempt, 8))

    def first_call(self) -> None:
        """A file group's first call went out: it earns the budget a fraction of a hedge."""
        self.first_calls += 1
        self.budget.deposit()

    def may_hedge(self) -> bool:
        """Spend a token for one hedge; False when hedging is off or the budget is spent."""
        if not self.policy.hedging:
            return False
        if self.budget.spend():
            self.hedges += 1
            return True
        self.hedges_refused += 1
        return False

    # ------------------------------------------------------------------ outcomes
    def answered(self, node: str, now: float, seconds: float) -> None:
        """A call completed (an answer of any Milvus status): a latency sample, the streak ends."""
        self._window(node).add(now, seconds)
        self._streak[node] = 0

    def slow(self, node: str, ejected: int, total: int) -> bool:
        """A call timed out or lost to a hedge; True when the node should be ejected now.

        `ejected` nodes of `total` are out of routing already; ejecting must leave no more than
        max_ejected_share of them out (always at least one may go when there are two or more).
        """
        streak = self._streak.get(node, 0) + 1
        self._streak[node] = streak
        if streak < self.policy.ejection_threshold:
            return False
        allowed = max(1, math.floor(self.policy.max_ejected_share * total)) if total > 1 else 0
        if ejected + 1 > allowed:
            return False
        self._streak[node] = 0
        return True

    def streak(self, node: str) -> int:
        return self._streak.get(node, 0)

    def forget(self, node: str) -> None:
        """The node left (or came back after ejection): start its history afresh."""
        self._latency.pop(node, None)
        self._streak.pop(node, None)

"""The watch window's statistics, as pure functions: is the new version's thumbs-up rate worse?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.domain.policy import WatchPolicy


@dataclass(frozen=True)
class RateComparison:
    new_up: int
    new_n: int
    prev_up: int
    prev_n: int

    @property
    def new_rate(self) -> float:
        return self.new_up / self.new_n if self.new_n else 0.0

    @property
    def prev_rate(self) -> float:
        return self.prev_up / self.prev_n if self.prev_n else 0.0

    def p_value_worse(self) -> float:
        """One-sided two-proportion z-test p-value for "new rate < previous rate"."""
        if not self.new_n or not self.prev_n:
            return 1.0
        pooled = (self.new_up + self.prev_up) / (self.new_n + self.prev_n)
        se = math.sqrt(pooled * (1 - pooled) * (1 / self.new_n + 1 / self.prev_n))
        if se == 0:
            return 0.0 if self.new_rate < self.prev_rate else 1.0
        z = (self.new_rate - self.prev_rate) / se
        return 0.5 * math.erfc(-z / math.sqrt(2))


@dataclass(frozen=True)
class WatchDecision:
    action: str  # "rollback" | "keep" | "wait"
    reason: str


def judge(cmp: RateComparison, policy: WatchPolicy, *, window_over: bool) -> WatchDecision:
    """Roll back when the new version is worse beyond max_drop with significance alpha."""
    drop = cmp.prev_rate - cmp.new_rate
    summary = (f"thumbs-up {cmp.new_rate:.0%} of {cmp.new_n} vs {cmp.prev_rate:.0%} of "
               f"{cmp.prev_n} for the previous version")
    if cmp.new_n < policy.min_samples:
        if window_over:
            return WatchDecision("keep", f"window closed with only {cmp.new_n} ratings "
                                         f"(< {policy.min_samples}): kept; {summary}")
        return WatchDecision("wait", f"{cmp.new_n}/{policy.min_samples} ratings so far; {summary}")
    if cmp.prev_n == 0:
        return WatchDecision("keep" if window_over else "wait",
                             f"no ratings of the previous version to compare with; {summary}")
    p = cmp.p_value_worse()
    if drop > policy.max_drop and p < policy.alpha:
        return WatchDecision("rollback", f"{summary}: a drop of {drop:.0%} (> {policy.max_drop:.0%}"
                                         f" allowed), p = {p:.3g} < {policy.alpha}")
    if window_over:
        return WatchDecision("keep", f"window closed; {summary} (p = {p:.3g})")
    return WatchDecision("wait", f"{summary} (p = {p:.3g})")

"""Failed authentication costs the caller, not the service: per client address, a fixed
one-minute window of failed key lookups; past the limit the address gets 429 before any
database query. Valid keys are answered from their own cache first, so a flood of random keys
from one address neither evicts them nor slows them down."""

from __future__ import annotations

import time
from collections import OrderedDict


class FailedAuthThrottle:
    """Counts failed authentications per client address in one-minute windows (per process)."""

    def __init__(self, per_minute: int, max_addresses: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()  # addr -> (window, n)

    def begin(self, addr: str, now: float | None = None) -> int | None:
        """Before an uncached key lookup: counts it as a failure in advance (so concurrent
        lookups cannot overshoot the limit) and returns None, or, past the limit, the seconds
        until this address may try again."""
        now = time.time() if now is None else now
        window = int(now // 60)
        old_window, n = self._counts.pop(addr, (window, 0))
        n = n if old_window == window else 0
        if n >= self.per_minute:
            self._counts[addr] = (window, n)
            return max(1, 60 - int(now % 60))
        self._counts[addr] = (window, n + 1)
        while len(self._counts) > self.max_addresses:
            self._counts.popitem(last=False)  # the address seen longest ago
        return None

    def succeeded(self, addr: str) -> None:
        """The lookup found a valid key: it was not a failure after all."""
        if addr in self._counts:
            window, n = self._counts[addr]
            self._counts[addr] = (window, max(0, n - 1))

"""The API's route and key caches: routing_cache_ttl_s bounds how stale a route can be, even
when the database read behind an entry is slow or two reads race."""

from __future__ import annotations

from service.api.state import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_ttl_from_when_its_read_began_not_when_it_ended():
    clock = Clock()
    cache = TTLCache(1.0, clock=clock)
    read_at = clock.now          # the read starts (before a swap commits) ...
    clock.now += 0.8             # ... and is slow
    cache.put("alias", "v1", read_at)
    assert cache.get("alias") == (True, "v1")
    clock.now += 0.3             # 1.1 s after the read began: past the bound, so read again
    assert cache.get("alias") == (False, None)
    assert cache.stale("alias") == (True, "v1")  # still there for a database outage


def test_a_slow_earlier_read_never_replaces_a_later_one():
    clock = Clock()
    cache = TTLCache(1.0, clock=clock)
    slow_read = clock.now        # begins before the swap: it will answer v1
    clock.now += 0.2
    fast_read = clock.now        # begins after the swap: v2, and it finishes first
    cache.put("alias", "v2", fast_read)
    clock.now += 0.3
    cache.put("alias", "v1", slow_read)
    assert cache.get("alias") == (True, "v2")
    # Without a read time, an entry counts from now, and it replaces an older one.
    clock.now += 2.0
    cache.put("alias", "v3")
    assert cache.get("alias") == (True, "v3")
    clock.now += 0.99
    assert cache.get("alias") == (True, "v3")


def test_past_max_entries_the_least_recently_used_goes():
    clock = Clock()
    cache = TTLCache(10.0, max_entries=2, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == (True, 1)
    cache.put("c", 3)
    assert cache.get("b") == (False, None) and cache.stale("b") == (False, None)
    assert cache.get("a") == (True, 1) and cache.get("c") == (True, 3)

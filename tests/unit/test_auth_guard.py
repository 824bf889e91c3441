"""service.api.auth_guard: failed authentications counted per client address."""

from __future__ import annotations

from service.api.auth_guard import FailedAuthThrottle


def test_failed_auth_is_counted_per_address_and_window():
    t = FailedAuthThrottle(per_minute=3, max_addresses=2)
    assert [t.begin("a", now=60.0) for _ in range(3)] == [None, None, None]
    assert t.begin("a", now=70.0) == 50  # past the limit: seconds to the next minute
    t.succeeded("b")  # unknown address: nothing to undo
    assert t.begin("b", now=70.0) is None
    t.succeeded("b")  # a valid key was not a failure
    assert t.begin("a", now=120.0) is None  # a new window
    assert t.begin("c", now=121.0) is None and "b" not in t._counts  # bounded: oldest goes

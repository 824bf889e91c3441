"""Credentials as the tests send them: a key's bearer header, and the /metrics token."""

from __future__ import annotations

# The token the session's API is started with (conftest's api_settings); /metrics asks for it.
METRICS_TOKEN = "test-metrics-token"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}

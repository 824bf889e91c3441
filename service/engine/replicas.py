"""The gateway's view of the vLLM replicas: which are healthy and which adapters each holds.

The reconciler (and the gateway itself, on connection failures) update it; the gateway asks it
for the replicas that can serve a model name, so no request is sent where its adapter is absent.
Replica discovery (service.engine.discovery) adds and removes replicas while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Replica:
    url: str
    client: httpx.AsyncClient
    healthy: bool = True
    # None: not observed yet, assume it can serve anything (vLLM answers 404 if not).
    loaded: set[str] | None = None
    down_until: float = 0.0
    last_error: str | None = field(default=None)
    max_model_len: int | None = None  # None: not observed yet
    source: str | None = None  # the FLYWHEEL_VLLM_URLS entry it was discovered from

    def is_up(self) -> bool:
        return self.healthy and time.monotonic() >= self.down_until

    def can_serve(self, model: str, base_name: str) -> bool:
        if not self.is_up():
            return False
        return model == base_name or self.loaded is None or model in self.loaded


class ReplicaPool:
    """Round-robin over the replicas that hold a model, skipping ones recently seen down."""

    def __init__(self, urls: list[str], *, base_name: str, connect_timeout_s: float,
                 read_timeout_s: float, down_cooldown_s: float = 2.0,
                 sources: dict[str, str] | None = None) -> None:
        self.base_name = base_name
        self.down_cooldown_s = down_cooldown_s
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        # A removed replica's requests may still be running: its client closes once the
        # longest of them would have timed out.
        self.close_delay_s = read_timeout_s
        self.replicas = [self._replica(u, (sources or {}).get(u)) for u in urls]
        self._closing: set[asyncio.Task] = set()
        self._rr = itertools.count()
        # Desired versions the reconciler refused to load (version id -> rejection code), for
        # /readyz: no lora names there, they carry tenant and alias names.
        self.refused: dict[str, str] = {}

    def _replica(self, url: str, source: str | None, **state) -> Replica:
        # keepalive pool sized for a busy gateway; vLLM handles concurrency itself.
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        return Replica(url=url, source=source, **state,
                       client=httpx.AsyncClient(base_url=url, timeout=self._timeout, limits=limits))

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def add(self, url: str, source: str | None = None) -> None:
        """A replica that appeared: routed for the base model at once, for a version only once
        the observer has seen it hold that version (the reconciler loads the desired ones)."""
        if url not in self.urls:
            self.replicas = [*self.replicas, self._replica(url, source, loaded=set())]

    def remove(self, url: str) -> None:
        """A replica that vanished: out of routing now, its client closed after close_delay_s."""
        gone = [r for r in self.replicas if r.url == url]
        self.replicas = [r for r in self.replicas if r.url != url]
        for r in gone:
            task = asyncio.ensure_future(self._close_later(r.client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, client: httpx.AsyncClient) -> None:
        try:
            await asyncio.sleep(self.close_delay_s)
        finally:
            await client.aclose()

    def candidates(self, model: str) -> list[Replica]:
        """Replicas able to serve model, rotated so load spreads.

        When no replica is known to hold the model, every healthy one is tried: a swap loads a
        version everywhere before the alias flips to it, so the observer can only be behind (a
        404 from vLLM moves the request on to the next replica).
        """
        able = [r for r in self.replicas if r.can_serve(model, self.base_name)]
        if not able:
            able = [r for r in self.replicas if r.is_up()]
        if not able:
            return []
        start = next(self._rr) % len(able)
        return able[start:] + able[:start]

    def up(self) -> list[Replica]:
        """Replicas not known to be down, in configured order; unlike candidates() this does not
        advance the round robin (a side call must not skew which replica serves requests)."""
        return [r for r in self.replicas if r.is_up()]

    def mark_down(self, replica: Replica, error: str) -> None:
        replica.down_until = time.monotonic() + self.down_cooldown_s
        replica.last_error = error

    def observe(self, url: str, *, healthy: bool, loaded: set[str] | None,
                max_model_len: int | None = None) -> None:
        """Record what the reconciler saw on a replica."""
        for r in self.replicas:
            if r.url == url:
                r.healthy = healthy
                r.loaded = loaded
                if max_model_len is not None:
                    r.max_model_len = max_model_len
                if healthy:
                    r.down_until = 0.0

    def context_len(self) -> int | None:
        """The smallest context any replica reported (a request must fit wherever it lands)."""
        known = [r.max_model_len for r in self.replicas if r.max_model_len]
        return min(known) if known else None

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()  # closes its client on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for r in self.replicas:
            await r.client.aclose()

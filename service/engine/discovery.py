"""Which vLLM replicas FLYWHEEL_VLLM_URLS names: every entry whose host is a DNS name is resolved,
and a name with several addresses (a Kubernetes headless Service) is one replica per address.

- A literal IP is one replica, as configured.
- A name that has only ever had one address (`localhost`, a StatefulSet pod's own name) is one
  replica under that name, as configured: the connection follows the name when its pod moves.
- A name seen with several addresses becomes `scheme://ADDRESS:port` per address, from then on
  even when it is down to one, so a replica keeps its identity while the Service scales.
- One address family per name: IPv4 when there is any, else IPv6 (a dual-stack Service lists
  each pod twice; `localhost` answers 127.0.0.1 and ::1 for one server).

A lookup that fails keeps the entry's last known replicas (with the error, shown on /readyz and
the ops page); with none known yet the entry stays as configured, which is what the HTTP client
would have resolved by itself. Lookups block, so the API runs them in a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

log = logging.getLogger(__name__)

# host -> its addresses; raises OSError (socket.gaierror) when the lookup fails.
Resolver = Callable[[str], list[str]]


def system_resolver(host: str) -> list[str]:
    """The host's addresses through the system resolver (/etc/hosts, DNS), one family."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    v4 = {i[4][0] for i in infos if i[0] == socket.AF_INET}
    v6 = {str(i[4][0]) for i in infos if i[0] == socket.AF_INET6}
    return sorted(v4 or v6, key=ipaddress.ip_address)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_address(parts: SplitResult, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class Lookup:
    """One entry's replicas as of one resolution."""

    entry: str
    urls: tuple[str, ...]
    expanded: bool  # a name turned into one replica per address
    error: str | None = None
    resolved_at: float | None = None  # time.time() of the last successful lookup; None: none


def look_up(entry: str, resolve: Resolver, *, previous: Lookup | None = None) -> Lookup:
    """Resolve one configured URL (see the module's docstring); never raises."""
    parts = urlsplit(entry)
    host = parts.hostname
    if not host or _is_ip(host):
        return Lookup(entry, (entry,), expanded=False)  # nothing to look up
    try:
        addresses = resolve(host)
        if not addresses:
            raise OSError(f"{host} has no address")
    except (OSError, UnicodeError) as e:
        reason = f"{host}: {e.strerror if isinstance(e, socket.gaierror) and e.strerror else e}"
        if previous is not None and previous.urls:
            return Lookup(entry, previous.urls, previous.expanded, reason, previous.resolved_at)
        return Lookup(entry, (entry,), expanded=False, error=reason)
    expanded = len(addresses) > 1 or (previous is not None and previous.expanded)
    urls = tuple(_with_address(parts, a) for a in addresses) if expanded else (entry,)
    return Lookup(entry, urls, expanded, resolved_at=time.time())


@dataclass(frozen=True)
class Change:
    """Replicas that appeared and vanished in one refresh."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Discovery:
    """The replica set of one process: resolved at construction, re-resolved by refresh()."""

    def __init__(self, entries: Sequence[str], resolve: Resolver = system_resolver) -> None:
        self.entries = list(dict.fromkeys(entries))
        self.resolve = resolve
        self.lookups: dict[str, Lookup] = {e: look_up(e, resolve) for e in self.entries}
        self._log_errors()

    @property
    def urls(self) -> list[str]:
        """Every replica, in configured order, each once."""
        return list(dict.fromkeys(u for e in self.entries for u in self.lookups[e].urls))

    def source_of(self, url: str) -> str | None:
        """The configured entry a replica came from."""
        return next((e for e in self.entries if url in self.lookups[e].urls), None)

    @property
    def errors(self) -> dict[str, str]:
        """entry -> why its last lookup failed (its last known replicas are kept)."""
        return {e: lk.error for e, lk in self.lookups.items() if lk.error}

    async def refresh(self) -> Change:
        """Resolve every entry again (in a thread) and report which replicas came and went."""
        before = self.urls
        previous = dict(self.lookups)
        fresh = await asyncio.to_thread(
            lambda: {e: look_up(e, self.resolve, previous=previous[e]) for e in self.entries})
        self.lookups = fresh
        self._log_errors(previous)
        after = self.urls
        return Change(added=[u for u in after if u not in before],
                      removed=[u for u in before if u not in after])

    def _log_errors(self, previous: dict[str, Lookup] | None = None) -> None:
        for e, lk in self.lookups.items():
            was = previous[e].error if previous else None
            if lk.error and lk.error != was:
                log.warning("replica discovery: %s: %s; keeping %d known replica(s)", e, lk.error,
                            len(lk.urls))
            elif was and not lk.error:
                log.info("replica discovery: %s resolves again (%d replica(s))", e, len(lk.urls))


async def resolve_urls(entries: Sequence[str], resolve: Resolver = system_resolver) -> list[str]:
    """One-shot expansion for an engine operation (a worker's swap, the CLI)."""
    return (await asyncio.to_thread(Discovery, entries, resolve)).urls

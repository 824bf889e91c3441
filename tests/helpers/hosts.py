"""A DNS name the test controls, through the system resolver: lines in /etc/hosts carrying a
unique marker (glibc reads the file on every lookup, and returns every line of a name). Only the
marked lines are ever written or removed, under an exclusive lock, and they are gone at exit."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

HOSTS = Path("/etc/hosts")


class HostsName:
    """One name in /etc/hosts; set() gives it addresses, set([]) removes it."""

    def __init__(self, name: str, path: Path = HOSTS) -> None:
        self.name = name
        self.path = path
        self.marker = f"# flywheel-test {uuid.uuid4().hex}"

    def set(self, addresses: Sequence[str]) -> None:
        self._rewrite([f"{a} {self.name} {self.marker}\n" for a in addresses])

    def _rewrite(self, mine: list[str]) -> None:
        # In place (r+), not a rename: /etc/hosts is often a bind mount.
        with self.path.open("r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            kept = [line for line in f.readlines() if self.marker not in line]
            if kept and not kept[-1].endswith("\n"):
                kept[-1] += "\n"
            f.seek(0)
            f.writelines(kept + mine)
            f.truncate()


@contextmanager
def hosts_name(addresses: Sequence[str], path: Path = HOSTS) -> Iterator[HostsName]:
    """A fresh name resolving to ``addresses``; its lines are removed on exit."""
    if not os.access(path, os.W_OK):
        pytest.fail(f"{path} is not writable: this test needs a name it controls (run as root)")
    entry = HostsName(f"fw-replicas-{uuid.uuid4().hex[:8]}.test", path)
    entry.set(addresses)
    try:
        yield entry
    finally:
        entry.set([])

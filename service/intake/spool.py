"""A durable local spool for what Postgres could not take: append-only, fsync'd, bounded.

Each API process appends to its own file, which it holds an exclusive flock on; a file nobody
holds (its process died) is an orphan, adopted by the next process that looks. A record is one
line, `<crc32 hex> <json>\\n`, so a torn last write (a crash mid-append) is recognised and
dropped: it was never acknowledged, because a record is acknowledged only after its fsync.

This module is plain file I/O with no database in it; service.spool_replay writes records
back to Postgres, in order, and then clears them here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIX = ".spool"


class SpoolFull(Exception):
    """The spool would pass its size bound; the record was not written."""


class SpoolUnavailable(Exception):
    """The spool could not write the record (disk error, full disk)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot spool a {type(value).__name__}")


def encode(record: dict[str, Any]) -> bytes:
    """One spool line for a record: its crc32, a space, its JSON, a newline."""
    body = json.dumps(record, default=_json_default, ensure_ascii=False,
                      separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The records in a spool file's bytes, and how many bytes they span. Reading stops at the
    first line that is incomplete or fails its checksum: nothing after it was acknowledged
    (appends are sequential and each is fsync'd before the next is acknowledged)."""
    records: list[dict[str, Any]] = []
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        crc, _, body = line.partition(b" ")
        try:
            ok = int(crc, 16) == zlib.crc32(body)
            record = json.loads(body) if ok else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            break
        records.append(record)
        pos = end + 1
    return records, pos


@dataclass
class SpoolFile:
    """One locked spool file: this process's own, or an adopted orphan."""

    path: Path
    fd: int
    size: int = 0
    records: int = 0
    own: bool = False  # this process appends to it; an orphan only drains

    def close(self) -> None:
        os.close(self.fd)  # releases the flock


@dataclass
class Spool:
    """The spool directory of one process. Thread-safe: appends run in a worker thread."""

    directory: Path
    max_bytes: int
    _own: SpoolFile | None = None
    _orphans: list[SpoolFile] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _broken: SpoolUnavailable | None = None

    def open(self) -> None:
        """Create this process's file (locked) and adopt every orphan in the directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{datetime.now().strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-" \
                                f"{uuid.uuid4().hex[:8]}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._own = SpoolFile(path, fd, own=True)
        self.adopt_orphans()

    def adopt_orphans(self) -> int:
        """Lock every spool file no live process holds; returns how many were adopted."""
        held = {f.path for f in self._files()}
        adopted = 0
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in held:
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:  # another process adopted and cleared it meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not path.exists():  # cleared by its adopter between our open and our lock
                os.close(fd)
                continue
            records, size = decode(_read_all(fd))
            if not records:  # empty, or only a torn write that was never acknowledged
                path.unlink(missing_ok=True)
                os.close(fd)
                continue
            with self._lock:
                self._orphans.append(SpoolFile(path, fd, size=size, records=len(records)))
            adopted += 1
            log.warning("adopted spool file %s: %d records to replay", path.name, len(records))
        return adopted

    def _files(self) -> list[SpoolFile]:
        return [*self._orphans, *([self._own] if self._own else [])]

    @property
    def own_name(self) -> str:
        """The name of this process's own file."""
        if self._own is None:
            raise SpoolUnavailable("the spool is not open")
        return self._own.path.name

    @property
    def size(self) -> int:
        """Bytes held, over every file."""
        return sum(f.size for f in self._files())

    @property
    def depth(self) -> int:
        """Records held, over every file."""
        return sum(f.records for f in self._files())

    def append_many(self, records: list[dict[str, Any]]) -> list[BaseException | None]:
        """Append records with one fsync; per record, None once durable, or why it was not
        written (SpoolFull past the bound; SpoolUnavailable on a write error, for all)."""
        own = self._own
        if own is None:
            raise SpoolUnavailable("the spool is not open")
        if self._broken is not None:
            return [self._broken] * len(records)
        out: list[BaseException | None] = []
        lines: list[bytes] = []
        with self._lock:
            room = self.max_bytes - self.size
            for record in records:
                line = encode(record)
                if len(line) > room:
                    out.append(SpoolFull(f"the spool holds {self.size} bytes of at most "
                                         f"{self.max_bytes}"))
                    continue
                room -= len(line)
                lines.append(line)
                out.append(None)
            if not lines:
                return out
            data = b"".join(lines)
            try:
                _write_all(own.fd, data)
                os.fsync(own.fd)
            except OSError as exc:
                failure = SpoolUnavailable(f"could not write the spool: {exc.strerror or exc}")
                # A partial write is torn garbage at the tail: cut it so later appends stay
                # readable (a later append's fsync makes the cut durable too). If even that
                # fails, this file takes nothing more: records behind garbage would be lost.
                try:
                    os.ftruncate(own.fd, own.size)
                except OSError:
                    self._broken = failure
                return [failure if r is None else r for r in out]
            own.size += len(data)
            own.records += len(lines)
        return out

    def pending(self) -> Iterator[tuple[SpoolFile, list[dict[str, Any]], int]]:
        """Each file holding records, oldest first (orphans, then this process's own), with its
        records and the byte offset they end at."""
        for f in self._files():
            with self._lock:
                if f.records == 0:
                    continue
                records, end = decode(_read_all(f.fd))
            yield f, records, end

    def clear(self, f: SpoolFile, end: int) -> bool:
        """Forget f's records up to `end`, once replayed. An orphan is deleted; this process's
        own file is truncated, but only when nothing was appended past `end` meanwhile (else
        False: the caller replays again from the start, which is idempotent)."""
        with self._lock:
            if f.own:
                if f.size != end:
                    return False
                _truncate(f.fd, 0)
                f.size = f.records = 0
                return True
            f.path.unlink(missing_ok=True)
            f.close()
            self._orphans.remove(f)
            return True

    def close(self) -> None:
        """Release every lock; files with records stay for the next process to adopt."""
        with self._lock:
            for f in self._files():
                if f.records == 0:
                    f.path.unlink(missing_ok=True)
                f.close()
            self._own, self._orphans = None, []


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    os.fsync(fd)

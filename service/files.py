"""Files and folders that appear complete or not at all.

Everything is written under a temporary name beside its target (the same file system), flushed to
disk, then renamed into place: a rename within one file system is atomic, so a crash, a kill or a
full disk never leaves a half-written file or folder for a reader, or for a retry to mistake for
a finished one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_path",
    "publish_dir",
    "staging_dir",
]


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file to write whose contents replace ``path`` when the block ends without an
    error; on an error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    # A name of its own per writer: processes (DDP ranks) writing the same file never collide.
    # Created like open() would (mode 0666 less the umask), unlike mkstemp's private 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (see :func:`atomic_open`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A fresh, empty folder beside ``target`` to build it in before :func:`publish_dir`.

    Readable by other users (mkdtemp makes it private; the engine, or the API serving downloads,
    may run as another user). Its name starts with ``.{target name}.tmp-``: what a crash left
    behind can be found by that prefix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    return tmp


def publish_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str], *,
                replace: bool = False) -> None:
    """Flush the finished folder ``tmp`` to disk and rename it to ``target``.

    replace: an existing ``target`` (incomplete, or being rebuilt) is renamed aside, the new one
    renamed in, then the old one removed: lock-free readers see a target all but for the instant
    between two renames, and a failed rename puts the old one back. Without it an existing
    non-empty ``target`` raises OSError: a folder is never merged into another.
    """
    tmp, target = Path(tmp), Path(target)
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    old = None
    if replace and target.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)

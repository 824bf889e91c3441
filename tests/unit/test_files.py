"""service.files: files and folders appear complete or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service.files import atomic_open, atomic_write_text, publish_dir, staging_dir


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() makes it


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_publish_dir_never_merges_unless_asked(tmp_path):
    target = tmp_path / "sub" / "artifact"
    tmp = staging_dir(target)
    assert tmp.parent == target.parent and tmp.name.startswith(".artifact.tmp-")
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o755
    (tmp / "w").write_text("1")
    publish_dir(tmp, target)
    assert (target / "w").read_text() == "1" and not tmp.exists()

    again = staging_dir(target)
    (again / "w").write_text("2")
    with pytest.raises(OSError):
        publish_dir(again, target)
    publish_dir(again, target, replace=True)
    assert (target / "w").read_text() == "2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["artifact"]


def test_a_failed_replace_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "artifact"
    first = staging_dir(target)
    (first / "w").write_text("old")
    publish_dir(first, target)
    new = staging_dir(target)
    (new / "w").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == new:  # the new folder's rename fails (say, the disk)
            raise OSError("rename refused")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        publish_dir(new, target, replace=True)
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [new.name, "artifact"]

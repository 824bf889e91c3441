"""The local spool: durable appends, torn tails, its bound, and orphans of dead processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from service.intake import spool as spool_mod
from service.intake.spool import Spool, SpoolFull, SpoolUnavailable, decode, encode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _open(tmp_path, max_bytes: int = 1 << 20) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes=max_bytes)
    s.open()
    return s


def test_records_round_trip_with_uuids_and_unicode():
    iid = uuid.uuid4()
    data = encode({"kind": "interaction", "values": {"id": iid, "text": "héllo\n\u2028"}})
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # one line whatever the text holds
    records, end = decode(data)
    assert records == [{"kind": "interaction", "values": {"id": str(iid), "text": "héllo\n\u2028"}}]
    assert end == len(data)


def test_a_torn_or_corrupt_tail_ends_the_records():
    a, b = encode({"n": 1}), encode({"n": 2})
    assert decode(a + b[:-3]) == ([{"n": 1}], len(a))  # a crash mid-append
    flipped = b[:12] + bytes([b[12] ^ 1]) + b[13:]
    assert decode(a + flipped + a) == ([{"n": 1}], len(a))  # nothing after a bad checksum


def test_appends_are_counted_and_read_back_in_order(tmp_path):
    s = _open(tmp_path)
    assert s.append_many([{"n": 1}, {"n": 2}]) == [None, None]
    assert s.append_many([{"n": 3}]) == [None]
    assert s.depth == 3
    [(f, records, end)] = list(s.pending())
    assert [r["n"] for r in records] == [1, 2, 3]
    assert end == s.size == os.path.getsize(f.path)


def test_the_bound_refuses_what_does_not_fit_and_keeps_the_rest(tmp_path):
    one = len(encode({"n": 1}))
    s = _open(tmp_path, max_bytes=2 * one)
    out = s.append_many([{"n": 1}, {"n": 2}, {"n": 3}])
    assert out[:2] == [None, None] and isinstance(out[2], SpoolFull)
    assert "at most" in str(out[2])
    assert s.depth == 2


def test_clear_truncates_the_own_file_only_when_nothing_came_after(tmp_path):
    s = _open(tmp_path)
    s.append_many([{"n": 1}])
    [(f, _, end)] = list(s.pending())
    s.append_many([{"n": 2}])  # arrived while the first was being written back
    assert s.clear(f, end) is False and s.depth == 2
    [(f, _, end)] = list(s.pending())
    assert s.clear(f, end) is True
    assert s.depth == 0 and s.size == 0 and list(s.pending()) == []


def test_a_write_error_is_refused_and_leaves_no_torn_bytes(tmp_path, monkeypatch):
    s = _open(tmp_path)
    s.append_many([{"n": 1}])

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "fsync", no_space)
    out = s.append_many([{"n": 2}])
    assert isinstance(out[0], SpoolUnavailable) and "No space left" in str(out[0])
    monkeypatch.undo()
    assert s.append_many([{"n": 3}]) == [None]
    [(_, records, _)] = list(s.pending())
    assert [r["n"] for r in records] == [1, 3]


def test_a_live_spool_is_never_adopted(tmp_path):
    a = _open(tmp_path)
    a.append_many([{"n": 1}])
    b = _open(tmp_path)  # a second process on the same folder
    assert b.depth == 0 and b.adopt_orphans() == 0
    a.close()  # a clean stop with records left: they stay for whoever comes next
    assert b.adopt_orphans() == 1 and b.depth == 1


def test_the_spool_of_a_killed_process_is_adopted_with_every_acknowledged_record(tmp_path):
    folder = tmp_path / "spool"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from service.intake.spool import Spool
        s = Spool(__import__("pathlib").Path({str(folder)!r}), max_bytes=1 << 20)
        s.open()
        for n in range(50):
            assert s.append_many([{{"n": n}}]) == [None]
        # a torn write after the last acknowledged record, then death without cleanup
        os.write(s._own.fd, b"0000beef {{\\"n\\": 5")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    s = _open(tmp_path)
    assert s.depth == 50
    found = [rec["n"] for f, records, _ in s.pending() if not f.own for rec in records]
    assert found == list(range(50))
    f, _, end = next(iter(s.pending()))
    assert s.clear(f, end) and not f.path.exists()


def test_an_empty_orphan_is_removed(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / f"dead{spool_mod.SUFFIX}").write_bytes(b"0000 {torn")
    s = _open(tmp_path)
    assert s.depth == 0 and not (folder / f"dead{spool_mod.SUFFIX}").exists()


def test_appending_to_a_closed_spool_says_so(tmp_path):
    s = _open(tmp_path)
    s.close()
    with pytest.raises(SpoolUnavailable):
        s.append_many([{"n": 1}])

"""Atomic writes: readers see the old file or the new one, with the permissions a plain open gives."""

from __future__ import annotations

import os
import stat

import pytest

from childtune import fileio


def test_written_file_has_umask_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    path = fileio.atomic_write(tmp_path / "sub" / "a.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old
    assert path.read_text() == "{}"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = fileio.write_json(tmp_path / "m.json", {"a": 1})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(path, "new")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_two_writers_of_one_report_take_turns_and_both_blocks_survive(tmp_path):
    """Two studies sharing a report: the second waits for the first's lock, then keeps its block."""
    import threading

    from childtune.study.report import _write_block

    report = tmp_path / "RESULTS.md"
    report.write_text("# notes by hand\n")
    done = []
    with fileio.waiting_lock(tmp_path / ".RESULTS.md.lock"):
        writer = threading.Thread(target=lambda: done.append(_write_block(report, "block A", "a")))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not done  # waiting for the lock held here
        before = report.read_text()
    writer.join(timeout=10)
    assert done and not writer.is_alive()
    _write_block(report, "block B", "b")
    text = report.read_text()
    assert before == "# notes by hand\n"
    assert "# notes by hand" in text and "block A" in text and "block B" in text

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

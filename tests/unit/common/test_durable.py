"""Whole writes and atomic swaps, the two things durable files are built on."""

from __future__ import annotations

import errno
import os

import pytest

from rlbus.durable import EXCHANGE_UNSUPPORTED, exchange, fsync_tree, write_all


def test_write_all_goes_on_after_short_writes(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_exchange_swaps_two_folders_or_says_it_cannot(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    (tmp_path / "b" / "from_b").touch()
    fsync_tree(tmp_path)
    try:
        exchange(tmp_path / "a", tmp_path / "b")
    except OSError as exc:  # a filesystem without renameat2(RENAME_EXCHANGE)
        assert exc.errno in EXCHANGE_UNSUPPORTED
        pytest.skip(f"no atomic exchange here: {exc}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from_b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]
    with pytest.raises(OSError) as missing:
        exchange(tmp_path / "a", tmp_path / "nothing")
    assert missing.value.errno == errno.ENOENT

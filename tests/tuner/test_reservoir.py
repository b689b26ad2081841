"""Reservoir: bounded pools, persistence across restarts, atomic writes, clear failures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hpad.errors import ConfigError
from tuner.reservoir import Reservoir, ReservoirWriteError


def _img(value: int, gray: bool = False) -> np.ndarray:
    shape = (8, 10) if gray else (8, 10, 3)
    return np.full(shape, value, dtype=np.uint8)


def test_pools_are_bounded_oldest_evicted_verified_kept(tmp_path):
    res = Reservoir(tmp_path, recent_size=3, verified_size=2)
    res.add("bottle", "v1", _img(1), verified=True)
    for i in range(6):
        res.add("bottle", f"f{i}", _img(10 + i))
    assert [r.frame_id for r in res.samples("bottle", "recent")] == ["f3", "f4", "f5"]
    assert [r.frame_id for r in res.samples("bottle", "verified")] == ["v1"]
    assert len(list((tmp_path / "bottle" / "recent").glob("*.png"))) == 3  # evicted files are deleted
    images = res.load(res.samples("bottle", "recent"))
    assert [int(im[0, 0, 0]) for im in images] == [13, 14, 15]


def test_persists_across_restart_and_keeps_order(tmp_path):
    res = Reservoir(tmp_path, 5, 5)
    for i in range(4):
        res.add("widget", f"id/{i}", _img(i, gray=True))
    (tmp_path / "widget" / "recent" / ".000000000099_x.png.tmp").write_bytes(b"half")  # crash leftover
    again = Reservoir(tmp_path, 3, 5)  # smaller limit applies at load
    refs = again.samples("widget")
    assert [r.frame_id for r in refs] == ["id-1", "id-2", "id-3"]
    assert not list((tmp_path / "widget" / "recent").glob(".*.tmp"))
    new = again.add("widget", "next", _img(9, gray=True))
    assert new.seq == 4  # sequence continues after the restart
    assert again.load([new])[0].shape == (8, 10)


def test_unwritable_root_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        Reservoir(blocker / "sub", 3, 3)


def test_write_failure_leaves_reservoir_consistent(tmp_path, monkeypatch):
    res = Reservoir(tmp_path, 3, 3)
    res.add("bottle", "ok", _img(1))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ReservoirWriteError, match="No space left"):
        res.add("bottle", "lost", _img(2))
    monkeypatch.undo()
    assert [r.frame_id for r in res.samples("bottle")] == ["ok"]
    assert not list((tmp_path / "bottle" / "recent").glob(".*"))  # temp file removed
    assert res.add("bottle", "after", _img(3)).seq == 1


def test_unsafe_category_names_are_refused(tmp_path):
    res = Reservoir(tmp_path, 3, 3)
    for bad in ("../etc", "", "a/b", "x" * 65):
        with pytest.raises(ConfigError):
            res.add(bad, "f", _img(1))

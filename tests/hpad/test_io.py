"""hpad.io: atomic, durable writes (temp file in the same folder, fsync, rename, fsync of the folder)."""

from __future__ import annotations

import os
import stat

import pytest

from hpad.io import atomic_write_bytes, atomic_write_text


def test_writes_replaces_and_leaves_no_temp_file(tmp_path) -> None:
    target = tmp_path / "state.json"
    assert atomic_write_bytes(target, b"one") == target
    assert atomic_write_text(str(target), "two \u00e9") == target  # str paths too; text is UTF-8
    assert target.read_bytes() == "two \u00e9".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        assert os.path.dirname(src) == os.path.dirname(dst)  # the temp file lives beside the target
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert events[:2] == ["fsync-file", "replace"]
    assert events[2:] in ([], ["fsync-dir"])  # the folder too, where the platform opens folders (POSIX)
    if os.name == "posix":
        assert events[2:] == ["fsync-dir"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch, failing) -> None:
    target = tmp_path / "artifact.safetensors"
    target.write_bytes(b"old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.safetensors"]


def test_missing_folder_is_an_os_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_gets_the_usual_umask_permissions(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

"""Durable file writes: the one atomic-write helper for artifacts, reservoir samples and tuner state.

`atomic_write_bytes` writes to a new temporary file in the target's own directory (``.<name>.<random>.tmp``:
concurrent writers never share one, and readers that skip or clean up ``.*.tmp`` leftovers keep working),
flushes and fsyncs it, renames it over the target with `os.replace` (atomic on POSIX and Windows) and fsyncs
the directory so that the rename itself survives a power loss. A crash or an error at any point leaves either
the old file or the complete new one under the real name, never a half-written one; on an error the temporary
file is removed and the `OSError` propagates to the caller.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_directory"]


def fsync_directory(folder: Path) -> None:
    """fsync a directory so that a rename inside it is durable. A no-op where directories cannot be opened
    (Windows); an fsync error is raised."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # the platform does not open directories: nothing to sync
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring). The directory must exist.

    Returns ``path`` as a `Path`. Raises `OSError` (disk full, read-only volume, missing directory); the
    temporary file is removed then and ``path`` is unchanged.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never write through someone else's file; mode 0o666 & umask, as a plain open() would create it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the cleanup can fail for the same reason (no directory, EIO)
            tmp.unlink(missing_ok=True)
        raise
    fsync_directory(folder)
    return path


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))

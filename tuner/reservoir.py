"""Bounded, persistent reservoir of fresh normal frames per category.

Two pools per category: ``recent`` (confidently normal frames sampled by the scorers, newest kept) and
``verified`` (frames operators published with header ``verified=true``; never pushed out by unverified
ones). Each pool keeps at most its configured number of frames; the oldest are deleted first.

On disk: ``<root>/<category>/<pool>/<seq:012d>_<frame-id>.png``. The sequence number orders samples across
restarts (the in-memory index is rebuilt from the file names at start), writes are atomic (temporary file +
rename), so a crash never leaves a half-written sample under a real name. A failed write (disk full,
read-only volume) raises `ReservoirWriteError`; the reservoir stays consistent and usable.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hpad.errors import ConfigError, HpadError
from hpad.io import atomic_write_bytes

log = logging.getLogger(__name__)

POOLS = ("recent", "verified")
_NAME = re.compile(r"^(\d{12})_([A-Za-z0-9._-]{0,80})\.png$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReservoirWriteError(HpadError):
    """A sample could not be written (disk full, read-only or missing volume)."""


@dataclass(frozen=True)
class SampleRef:
    category: str
    pool: str
    seq: int
    frame_id: str
    path: Path


def check_category(category: str) -> str:
    if not _CATEGORY.match(category):
        raise ConfigError(f"category {category!r} is not a safe name (letters, digits, '.', '_', '-'; max 64)")
    return category


class Reservoir:
    """Per-category FIFO pools of normal frames on disk. Not thread-safe: one owner thread."""

    def __init__(self, root: Path, recent_size: int, verified_size: int) -> None:
        if recent_size < 1 or verified_size < 0:
            raise ConfigError(f"reservoir sizes must be recent >= 1, verified >= 0; got {recent_size}, {verified_size}")
        self.root = Path(root)
        self.limits = {"recent": recent_size, "verified": verified_size}
        self._index: dict[tuple[str, str], deque[SampleRef]] = {}
        self._next_seq: dict[str, int] = {}
        self._probe_writable()
        self._load()

    # ------------------------------------------------------------------------------------------ start-up
    def _probe_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"reservoir directory {self.root} is not writable ({exc.strerror or exc}); mount a writable "
                "volume there or set HPAD_RESERVOIR_DIR"
            ) from exc

    def _load(self) -> None:
        for category_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            category = category_dir.name
            for pool in POOLS:
                folder = category_dir / pool
                if not folder.is_dir():
                    continue
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)  # a crash mid-write leaves only temp files
                refs = []
                for path in folder.iterdir():
                    match = _NAME.match(path.name)
                    if match:
                        refs.append(SampleRef(category, pool, int(match[1]), match[2], path))
                refs.sort(key=lambda ref: ref.seq)
                self._index[(category, pool)] = deque(refs)
                if refs:
                    self._next_seq[category] = max(self._next_seq.get(category, 0), refs[-1].seq + 1)
                self._evict(category, pool)

    # ------------------------------------------------------------------------------------------ queries
    def categories(self) -> list[str]:
        return sorted({category for category, _ in self._index})

    def samples(self, category: str, pool: str | None = None) -> list[SampleRef]:
        """Oldest first; both pools unless ``pool`` is given."""
        pools = POOLS if pool is None else (pool,)
        refs = [ref for p in pools for ref in self._index.get((category, p), ())]
        return sorted(refs, key=lambda ref: ref.seq)

    def size(self, category: str, pool: str) -> int:
        return len(self._index.get((category, pool), ()))

    def load(self, refs: list[SampleRef]) -> list[np.ndarray]:
        """Decode samples (RGB or grayscale uint8); unreadable files are skipped with a warning."""
        images = []
        for ref in refs:
            image = cv2.imread(str(ref.path), cv2.IMREAD_UNCHANGED)
            if image is None:
                log.warning("reservoir sample %s is unreadable; skipped", ref.path)
                continue
            images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image)
        return images

    # ------------------------------------------------------------------------------------------ updates
    def add(self, category: str, frame_id: str, image: np.ndarray, verified: bool = False) -> SampleRef:
        """Store one frame (uint8 HxW or HxWx3 RGB) as PNG and evict the oldest beyond the pool's limit."""
        check_category(category)
        pool = "verified" if verified else "recent"
        if self.limits[pool] == 0:
            raise ReservoirWriteError(f"the {pool} pool is disabled (size 0)")
        seq = self._next_seq.get(category, 0)
        safe_id = _SAFE.sub("-", frame_id)[:80]
        folder = self.root / category / pool
        path = folder / f"{seq:012d}_{safe_id}.png"
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".png", bgr)
        if not ok:
            raise ReservoirWriteError(f"frame {frame_id} could not be encoded as PNG")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, encoded.tobytes())  # removes its temporary file on an error
        except OSError as exc:
            raise ReservoirWriteError(f"cannot write reservoir sample {path}: {exc.strerror or exc}") from exc
        self._next_seq[category] = seq + 1
        ref = SampleRef(category, pool, seq, safe_id, path)
        self._index.setdefault((category, pool), deque()).append(ref)
        self._evict(category, pool)
        return ref

    def _evict(self, category: str, pool: str) -> None:
        refs = self._index.get((category, pool))
        while refs and len(refs) > self.limits[pool]:
            oldest = refs.popleft()
            oldest.path.unlink(missing_ok=True)

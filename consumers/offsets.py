"""Which offsets may be committed: contiguous, acknowledged output per partition; and consumer lag.

`OffsetBook` tracks every record from the moment ``poll`` returns it. A record becomes *done* when its
event or dead letter is acknowledged by the broker; the committable offset of a partition is one past the
longest done prefix, so a commit never passes a record whose output was not acknowledged, whatever order
stages finish in. Each partition carries an *epoch*: when it is revoked or lost the epoch changes, work
still in flight for the old epoch is ignored, and `release` says where a consumer that gets the partition
back must seek to (its fetch position survives a rebalance, records dropped in between would be skipped).

Thread-safe: the main loop, the output stage and the rebalance listener (kafka-python's IO thread) use it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from kafka.structs import TopicPartition


@dataclass
class _Partition:
    epoch: int
    pending: deque[list[int | bool]] = field(default_factory=deque)  # [offset, done], ascending offsets
    next_offset: int | None = None  # one past the longest done prefix
    committed: int | None = None  # what this worker committed (or found committed)

    def advance(self) -> None:
        while self.pending and self.pending[0][1]:
            self.next_offset = int(self.pending.popleft()[0]) + 1

    def first_open(self) -> int | None:
        return int(self.pending[0][0]) if self.pending else None


@dataclass(frozen=True)
class Release:
    """What to do when partitions leave: commit ``commit``; seek to ``rewind`` if one comes back."""

    commit: dict[TopicPartition, int]
    rewind: dict[TopicPartition, int]


class OffsetBook:
    """Per-partition record tracking. Offsets are Kafka 'next offset to read' values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._epochs: dict[TopicPartition, int] = {}

    def _part(self, tp: TopicPartition) -> _Partition:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition(epoch=self._epochs.get(tp, 0))
        return part

    def track(self, tp: TopicPartition, offset: int) -> int:
        """A record was polled; returns the partition epoch to hand back with `done`."""
        with self._lock:
            part = self._part(tp)
            if part.pending and offset <= int(part.pending[-1][0]):
                raise ValueError(f"{tp}: offset {offset} polled after {part.pending[-1][0]}")
            part.pending.append([offset, False])
            return part.epoch

    def done(self, tp: TopicPartition, offset: int, epoch: int) -> bool:
        """The record's output is acknowledged. False when the partition left since (stale work)."""
        with self._lock:
            part = self._parts.get(tp)
            if part is None or part.epoch != epoch:
                return False
            for entry in part.pending:
                if entry[0] == offset:
                    entry[1] = True
                    break
            else:
                return False
            part.advance()
            return True

    def is_current(self, tp: TopicPartition, epoch: int) -> bool:
        with self._lock:
            part = self._parts.get(tp)
            return part is not None and part.epoch == epoch

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose done prefix moved past what was committed."""
        with self._lock:
            return {tp: p.next_offset for tp, p in self._parts.items()
                    if p.next_offset is not None and (p.committed is None or p.next_offset > p.committed)}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, offset in offsets.items():
                part = self._parts.get(tp)
                if part is not None and (part.committed is None or offset > part.committed):
                    part.committed = offset

    def committed(self, tp: TopicPartition) -> int | None:
        with self._lock:
            part = self._parts.get(tp)
            return None if part is None else part.committed

    def pending(self, tp: TopicPartition | None = None) -> int:
        """Records polled but not done (all partitions when ``tp`` is None)."""
        with self._lock:
            parts = self._parts.values() if tp is None else [self._parts[tp]] if tp in self._parts else []
            return sum(len(p.pending) for p in parts)

    def release(self, partitions: set[TopicPartition]) -> Release:
        """Partitions leave this worker: what may still be committed, and where to rewind if they return.

        Their tracking is dropped and their epoch bumped, so stale in-flight work is ignored from now on.
        """
        commit: dict[TopicPartition, int] = {}
        rewind: dict[TopicPartition, int] = {}
        with self._lock:
            for tp in partitions:
                part = self._parts.pop(tp, None)
                self._epochs[tp] = self._epochs.get(tp, 0) + 1
                if part is None:
                    continue
                if part.next_offset is not None and (part.committed is None or part.next_offset > part.committed):
                    commit[tp] = part.next_offset
                first_open = part.first_open()
                if first_open is not None:
                    rewind[tp] = first_open
        return Release(commit=commit, rewind=rewind)

    def partitions(self) -> list[TopicPartition]:
        with self._lock:
            return list(self._parts)


def partition_lag(end_offset: int | None, position: int | None, committed: int | None) -> int | None:
    """Records of a partition not yet committed by the group: log end - committed offset.

    ``end_offset`` must be the high watermark from fetch responses (``KafkaConsumer.highwater``), not
    ``end_offsets()``: tansu answers ListOffsets with one past the *first* record of the last record batch
    (10 batches of 10 records give 91, not 100), while its fetch high watermark is exact (measured). The
    consumer's position is used as a floor (it is exact for everything read, and the high watermark is
    unknown before the first fetch). With nothing committed yet the whole log counts from offset 0.
    """
    ends = [v for v in (end_offset, position) if v is not None]
    if not ends:
        return None
    return max(0, max(ends) - (committed or 0))

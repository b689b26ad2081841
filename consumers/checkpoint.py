"""Committing the worker's progress: which offsets may be committed, committing them, backing off.

`Checkpoint` owns the worker's `OffsetBook` (per partition, one past the longest prefix of acknowledged
frames: nothing is committed for a frame whose event or dead letter was not acknowledged) and the consumer's
commits: `commit` on the main thread, throttled after a failure by capped exponential backoff (the frames
stay tracked and are committed by a later call); `commit_final` on shutdown; `commit_released` on kafka-python's
IO thread when partitions are revoked. With ``exactly_once`` the offsets travel inside each batch's
transaction instead (`consumers.output`), so the main-thread commits do nothing. It also knows each
partition's committed offset for the lag gauge (the group's, until this worker commits its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.future import Future as KafkaFuture
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers import kafka_io
from consumers.metrics import WorkerMetrics
from consumers.offsets import OffsetBook, partition_lag

log = logging.getLogger(__name__)


def _metadata(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}


class Checkpoint:
    """The offset book and the commits of one consumer."""

    def __init__(self, book: OffsetBook, consumer: KafkaConsumer, metrics: WorkerMetrics, exactly_once: bool,
                 backoff: kafka_io.Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self.book, self.consumer, self.metrics, self.exactly_once = book, consumer, metrics, exactly_once
        self.backoff, self.clock = backoff, clock
        self._next_commit = 0.0
        self._group_committed: dict[TopicPartition, int | None] = {}

    def commit(self, force: bool = False) -> bool:
        """Commit acknowledged progress (main thread). False when a commit failed (retried later)."""
        if self.exactly_once:
            return True
        now = self.clock()
        if not force and now < self._next_commit:
            return False
        offsets = self.book.committable()
        if not offsets:
            return True
        start = time.perf_counter()
        try:
            self.consumer.commit(_metadata(offsets))
        except KafkaError as exc:
            self.metrics.commits.labels(result="failed").inc()
            self._next_commit = now + self.backoff.next_delay()
            log.warning("offset commit failed (%s); will retry", exc)
            return False
        self.backoff.reset()
        self.metrics.stage.labels(stage="commit").observe(time.perf_counter() - start)
        self.metrics.commits.labels(result="ok").inc()
        self.book.mark_committed(offsets)
        return True

    def commit_final(self, attempts: int, wait_s: float) -> bool:
        """Shutdown: commit now, a few times if it fails."""
        for _ in range(attempts):
            if self.commit(force=True):
                return True
            time.sleep(wait_s)
        return False

    def commit_released(self, offsets: dict[TopicPartition, int], done: KafkaFuture) -> None:
        """Revoke (any thread): commit_async is scheduled thread-safely on the IO loop; its completion
        resolves ``done`` there. Under exactly-once nothing is committed, ``done`` resolves all the same."""
        meta = {} if self.exactly_once else _metadata(offsets)

        def finished(value: object) -> None:
            if isinstance(value, BaseException):
                self.metrics.commits.labels(result="failed").inc()
                log.warning("commit on revoke failed (%s): those frames will be processed again", value)
            elif meta:
                self.metrics.commits.labels(result="ok").inc()
                log.info("committed %s on revoke", {f"{tp.topic}[{tp.partition}]": o.offset for tp, o in meta.items()})
            done.success(None)

        try:
            self.consumer.commit_async(meta).add_both(finished)
        except KafkaError as exc:
            finished(exc)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions gone: their group offsets are read again if they come back."""
        for tp in partitions:
            self._group_committed.pop(tp, None)

    def committed(self, tp: TopicPartition) -> int | None:
        """This worker's last commit of ``tp``, else the group's (asked once)."""
        mine = self.book.committed(tp)
        if mine is not None:
            return mine
        if tp not in self._group_committed:
            self._group_committed[tp] = self.consumer.committed(tp, timeout_ms=5000)
        return self._group_committed[tp]

    def lags(self) -> dict[tuple[str, int], int]:
        """Records not yet committed, per assigned partition (high watermark - committed offset)."""
        lags: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            lag = partition_lag(self.consumer.highwater(tp), self.consumer.position(tp, timeout_ms=200),
                                self.committed(tp))
            if lag is not None:
                lags[(tp.topic, tp.partition)] = lag
        return lags

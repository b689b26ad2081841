"""Rebalances of the worker's consumer group (the listener runs on kafka-python's IO thread while the main
thread is inside ``poll``).

revoked -> wait (bounded) for in-flight batches, commit what is done, forget the partitions, remember where
to seek if one comes back; lost -> forget the partitions at once (their in-flight work is dropped);
assigned -> seek the partitions that came back. `Rebalancer.changes` counts the events that may have made
polled frames stale, so the main loop knows when to drop them from the batch it is forming.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka.future import Future as KafkaFuture
from kafka.structs import TopicPartition

from consumers.checkpoint import Checkpoint
from consumers.metrics import Health, WorkerMetrics
from consumers.pipeline import Pipeline

log = logging.getLogger(__name__)


class Rebalancer(AsyncConsumerRebalanceListener):
    """Async listener: awaiting keeps kafka-python's IO loop (and heartbeats) running while we drain."""

    def __init__(self, consumer: KafkaConsumer, checkpoint: Checkpoint, pipeline: Pipeline, health: Health,
                 metrics: WorkerMetrics, revoke_timeout_s: float,
                 on_assigned: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self.on_assigned = on_assigned  # told first when partitions arrive
        self.consumer, self.checkpoint, self.book, self.pipeline = consumer, checkpoint, checkpoint.book, pipeline
        self.health, self.metrics, self.revoke_timeout_s = health, metrics, revoke_timeout_s
        self.changes = 0  # revokes, losses and tracking resets so far
        self.closing = False  # set while the consumer closes: its revoke must not wait for the pipeline
        self.log: list[tuple[str, frozenset[TopicPartition]]] = []  # (revoked|assigned|lost, tps)
        self._rewind: dict[TopicPartition, int] = {}
        self._rewind_lock = threading.Lock()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned(set(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.lost(set(lost))

    def release(self, revoked: set[TopicPartition]) -> KafkaFuture:
        """Partitions are being revoked: drain, commit what is done, forget them. Returns an awaitable
        kafka Future that resolves on kafka-python's IO thread (through the commit) once that is done."""
        result = KafkaFuture()
        self.changes += 1
        self.log.append(("revoked", frozenset(revoked)))
        self.health.assigned = 0
        if not revoked:
            result.success(None)
            return result
        threading.Thread(target=self._release_work, args=(revoked, result), name="hpad-revoke", daemon=True).start()
        return result

    def _release_work(self, revoked: set[TopicPartition], result: KafkaFuture) -> None:
        offsets: dict[TopicPartition, int] = {}
        try:
            if not self.closing and not self.pipeline.wait_idle(self.revoke_timeout_s):
                log.warning("revoke: in-flight batches did not finish in %d ms; their frames stay uncommitted",
                            round(self.revoke_timeout_s * 1000))
            released = self.book.release(revoked)
            with self._rewind_lock:
                self._rewind.update(released.rewind)
            self.checkpoint.forget(revoked)
            offsets = released.commit
        finally:
            self.checkpoint.commit_released(offsets, result)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions arrived: those that came back are rewound to their first unfinished record."""
        if self.on_assigned is not None:
            self.on_assigned(assigned)
        self.log.append(("assigned", frozenset(assigned)))
        with self._rewind_lock:
            for tp in assigned & set(self._rewind):
                self.consumer.seek(tp, self._rewind[tp])
                log.info("%s came back: seeking to %d", tp, self._rewind[tp])
            self._rewind.clear()
        self.health.assigned = len(assigned)
        self.metrics.assigned.set(len(assigned))
        self.metrics.ready.set(1 if self.health.ready() else 0)
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    def lost(self, lost: set[TopicPartition]) -> None:
        """Membership lost: drop in-flight work of these partitions; the new owner reads them again."""
        self.changes += 1
        self.log.append(("lost", frozenset(lost)))
        self.book.release(lost)
        self.checkpoint.forget(lost)
        self.health.assigned = 0
        self.metrics.assigned.set(0)
        self.metrics.ready.set(0)
        log.warning("lost partitions %s (session expired?): their in-flight frames are dropped", sorted(lost))

    def reset(self, tp: TopicPartition, offset: int) -> None:
        """``tp`` went back to an offset before what is tracked (reset by the broker?): restart its tracking."""
        log.warning("%s went back to offset %d (reset by the broker?); restarting its tracking", tp, offset)
        self.book.release({tp})
        self.changes += 1

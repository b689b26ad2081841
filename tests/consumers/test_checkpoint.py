"""Checkpoint alone (fake consumer, fake clock): what is committed, backoff after a failure, exactly-once."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from consumers import kafka_io
from consumers.checkpoint import Checkpoint
from consumers.metrics import WorkerMetrics
from consumers.offsets import OffsetBook

TP = TopicPartition("frames", 0)


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail = False

    def commit(self, offsets) -> None:
        if self.fail:
            raise KafkaTimeoutError("broker away")
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


def checkpoint(exactly_once: bool = False) -> tuple[Checkpoint, FakeConsumer, OffsetBook, list[float]]:
    consumer, book, now = FakeConsumer(), OffsetBook(), [0.0]
    cp = Checkpoint(book, consumer, WorkerMetrics(), exactly_once, kafka_io.Backoff(1.0, 8.0), clock=lambda: now[0])
    return cp, consumer, book, now


def test_commits_one_past_the_acknowledged_prefix_only():
    cp, consumer, book, _ = checkpoint()
    epochs = [book.track(TP, offset) for offset in range(3)]
    book.done(TP, 0, epochs[0])
    book.done(TP, 2, epochs[2])  # 1 not acknowledged: 2 must wait
    assert cp.commit()
    assert consumer.commits == [{TP: 1}]
    assert cp.commit() and consumer.commits == [{TP: 1}]  # nothing new: no commit call


def test_a_failed_commit_backs_off_then_commits_again():
    cp, consumer, book, now = checkpoint()
    book.done(TP, 0, book.track(TP, 0))
    consumer.fail = True
    assert not cp.commit()
    consumer.fail = False
    now[0] = 0.5
    assert not cp.commit() and consumer.commits == []  # still backing off (1 s)
    assert cp.commit(force=True) and consumer.commits == [{TP: 1}]  # shutdown does not wait


def test_exactly_once_commits_nothing_here():
    cp, consumer, book, _ = checkpoint(exactly_once=True)
    book.done(TP, 0, book.track(TP, 0))
    assert cp.commit() and cp.commit_final(attempts=3, wait_s=0) and consumer.commits == []

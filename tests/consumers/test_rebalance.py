"""The rebalance listener alone (fake consumer): the assigned hook, seeks on return, losses."""

from __future__ import annotations

from types import SimpleNamespace

from kafka.structs import TopicPartition

from consumers.metrics import Health, WorkerMetrics
from consumers.offsets import OffsetBook
from consumers.rebalance import Rebalancer

TP = TopicPartition("frames", 0)


class FakeConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def rebalancer(on_assigned=None) -> tuple[Rebalancer, FakeConsumer, OffsetBook]:
    consumer, book = FakeConsumer(), OffsetBook()
    checkpoint = SimpleNamespace(book=book, forget=lambda tps: None)
    health = Health(60.0)
    health.model_loaded = True
    rb = Rebalancer(consumer, checkpoint, SimpleNamespace(), health, WorkerMetrics(), 1.0, on_assigned=on_assigned)
    return rb, consumer, book


def test_assigned_tells_the_hook_first_then_seeks_partitions_that_came_back():
    calls = []
    rb, consumer, _ = rebalancer(on_assigned=lambda tps: calls.append((set(tps), list(consumer.seeks))))
    rb._rewind[TP] = 7
    rb.assigned({TP})
    assert calls == [({TP}, [])]
    assert consumer.seeks == [(TP, 7)] and rb.health.assigned == 1 and rb.log == [("assigned", frozenset({TP}))]


def test_lost_forgets_in_flight_work_and_counts_a_change():
    rb, _, book = rebalancer()
    epoch = book.track(TP, 3)
    rb.lost({TP})
    assert rb.changes == 1 and not book.is_current(TP, epoch) and rb.health.assigned == 0


def test_reset_restarts_tracking_and_counts_a_change():
    rb, _, book = rebalancer()
    epoch = book.track(TP, 5)
    rb.reset(TP, 2)
    assert rb.changes == 1 and not book.is_current(TP, epoch)
    book.track(TP, 2)

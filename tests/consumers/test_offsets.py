"""OffsetBook (commits never pass unacknowledged output) and consumer lag on tansu's multi-record batches."""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.offsets import OffsetBook, partition_lag

TP = TopicPartition("frames", 0)
TP1 = TopicPartition("frames", 1)


def test_commit_only_contiguous_done_prefix():
    book = OffsetBook()
    epochs = {o: book.track(TP, o) for o in (10, 11, 12, 13)}
    assert book.committable() == {}
    book.done(TP, 12, epochs[12])
    assert book.committable() == {}  # 10 and 11 are not acknowledged yet
    book.done(TP, 10, epochs[10])
    assert book.committable() == {TP: 11}
    book.done(TP, 11, epochs[11])
    assert book.committable() == {TP: 13}
    book.mark_committed({TP: 13})
    assert book.committable() == {} and book.committed(TP) == 13 and book.pending(TP) == 1


def test_partitions_are_independent():
    book = OffsetBook()
    a, b = book.track(TP, 0), book.track(TP1, 5)
    book.done(TP1, 5, b)
    assert book.committable() == {TP1: 6}
    book.done(TP, 0, a)
    assert book.committable() == {TP: 1, TP1: 6}


def test_release_commits_done_work_rewinds_and_ignores_stale_completions():
    book = OffsetBook()
    epoch = [book.track(TP, o) for o in range(5)][-1]
    book.done(TP, 0, epoch)
    book.done(TP, 1, epoch)
    book.done(TP, 3, epoch)
    released = book.release({TP, TP1})
    assert released.commit == {TP: 2} and released.rewind == {TP: 2}
    assert book.done(TP, 2, epoch) is False  # stale: the partition left
    assert book.committable() == {} and book.pending() == 0
    new_epoch = book.track(TP, 2)  # the partition came back and was rewound
    assert new_epoch != epoch and book.done(TP, 2, new_epoch) and book.committable() == {TP: 3}


def test_out_of_order_offsets_are_refused():
    book = OffsetBook()
    book.track(TP, 5)
    with pytest.raises(ValueError):
        book.track(TP, 5)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_committable_never_passes_an_unacknowledged_offset(data):
    offsets = sorted(data.draw(st.sets(st.integers(0, 200), min_size=1, max_size=40)))
    book = OffsetBook()
    epochs = {o: book.track(TP, o) for o in offsets}
    order = data.draw(st.permutations(offsets))
    done: set[int] = set()
    for offset in order[: data.draw(st.integers(0, len(order)))]:
        book.done(TP, offset, epochs[offset])
        done.add(offset)
        position = book.committable().get(TP)
        if position is not None:
            assert all(o in done for o in offsets if o < position)
            assert position - 1 in done


def test_partition_lag():
    assert partition_lag(100, 100, 100) == 0
    assert partition_lag(100, 60, 40) == 60
    assert partition_lag(91, 100, 40) == 60  # an end below the position is not believed
    assert partition_lag(None, 30, None) == 30
    assert partition_lag(None, None, 5) is None


@pytest.mark.kafka
def test_lag_is_exact_on_multi_record_batches(kafka_broker):
    """tansu's end_offsets() is short for multi-record batches; the fetch high watermark is not."""
    topic = f"lag-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, 1)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=50)
    for _ in range(10):
        for i in range(10):
            producer.send(topic, value=b"x%d" % i, partition=0)
        producer.flush()
    producer.close()
    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=f"g-{topic}",
                             enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        consumer.assign([tp])
        read, deadline = 0, time.monotonic() + 20
        while read < 35 and time.monotonic() < deadline:
            read += sum(len(r) for r in consumer.poll(timeout_ms=200, max_records=7).values())
        consumer.commit()
        committed = consumer.committed(tp)
        lag = partition_lag(consumer.highwater(tp), consumer.position(tp), committed)
        assert lag == 100 - committed
        while read < 100 and time.monotonic() < deadline:
            read += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        consumer.commit()
        assert partition_lag(consumer.highwater(tp), consumer.position(tp), consumer.committed(tp)) == 0
    finally:
        consumer.close(autocommit=False)

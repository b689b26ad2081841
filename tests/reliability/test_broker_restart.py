"""The broker goes away mid-stream and comes back; the worker keeps running and loses nothing.

tansu keeps its log, producer state and committed offsets in S3 (a local moto server, see conftest.py), so
a broker that dies while the worker has batches in flight can be started again on the same port with its
data. Two ways to go: ``stop`` (SIGTERM, SIGKILL after 1 s, at a random point of the stream) and
``crash-mid-produce`` (SIGKILL 10 ms after the worker hands an event to its producer, i.e. while tansu
writes that batch to S3). Output is matched to input by frame_id.

Found here (fixed in consumers/kafka_io.py + consumers/delivery.py): tansu's s3 storage advances the
producer's sequence number (meta.json) before it writes the record batch (a separate object); killed in
between, it answers the producer's retry with DUPLICATE_SEQUENCE_NUMBER, which kafka-python's idempotent
producer reports as success with offset -1 although the records were never stored. Without the fix the
crash run lost the 4 events of the batch in flight in 6 runs of 6 (and committed past them); the worker
now re-sends any acknowledgement that carries no offset (`kafka_io.UnconfirmedWriteError`)."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import numpy as np
import pytest
from kafka.future import Future
from kafka.producer.future import RecordMetadata
from kafka.structs import TopicPartition

from consumers import kafka_io
from consumers.events import headers_as_text
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    WorkerThread,
    assert_commits_covered,
    committed_offsets,
    events_by_frame,
    good_frame,
    new_topics,
    publish,
    read_all,
    settings,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
QUIET = {"normals_topic": "", "prompts_topic": ""}  # no shared side topics: only frames, events and DLQ
CRASH_DELAY_S = 0.01  # SIGKILL this long after an event is handed over: lands in the S3 writes 2 runs in 3


class SlowScorer(Scorer):
    """The tiny scorer, slowed down so that batches are in flight when the broker goes away."""

    delay_s = 0.2

    def score_batch(self, frames, prompts=None, sizes=None):  # what the worker's score stage calls
        time.sleep(self.delay_s)
        return super().score_batch(frames, prompts, sizes)


def crash_during_next_produce(broker, events_topic: str, monkeypatch, delay_s: float = CRASH_DELAY_S) -> None:
    """SIGKILL the broker ``delay_s`` after the worker hands its next event to the producer (the produce
    request then is on the wire or being written to S3), wait for it to die, and clean up."""
    process = broker.process
    assert process is not None
    fired = threading.Event()
    real_send = kafka_io.send

    def send(producer, topic, *args, **kwargs):
        delivery = real_send(producer, topic, *args, **kwargs)
        if topic == events_topic and not fired.is_set():
            fired.set()
            threading.Timer(delay_s, process.kill).start()
        return delivery

    monkeypatch.setattr(kafka_io, "send", send)
    wait_for(lambda: process.poll() is not None, timeout=30, interval=0.005, what="the broker crashed")
    monkeypatch.setattr(kafka_io, "send", real_send)
    broker.stop()  # reaps nothing more; closes the log file


def outputs(broker, topics) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """(events by frame_id, dead-letter reasons by frame_id)."""
    events = events_by_frame(read_all(broker, topics.events))
    letters: dict[str, list[str]] = {}
    for record in read_all(broker, topics.dlq):
        text = headers_as_text(record.headers)
        letters.setdefault(text.get("frame_id", ""), []).append(text["hpad-error-class"])
    return events, letters


@pytest.mark.parametrize("how", ["stop", "crash-mid-produce"])
def test_broker_stopped_and_restarted_mid_stream_loses_nothing_tansu_only(s3_broker, make_worker, tiny_backbone,
                                                                           caplog, monkeypatch, how):
    """Invariant: every input frame ends as exactly one event or one dead letter; the only duplicates are
    frames at or after the committed offset at the moment the broker died (at-least-once, by frame_id);
    committed offsets never pass unacknowledged output, neither right after the restart nor at the end."""
    broker = s3_broker
    topics = new_topics(broker, partitions=2)
    rng = np.random.default_rng(21)
    frames = [good_frame(rng, camera=f"cam-{i % 2}", size=(240, 320)) for i in range(100)]
    for i, frame in enumerate(frames):
        frame.partition = i % 2
    sent = publish(broker, topics.frames, frames[:70])
    scorer = SlowScorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    worker = make_worker(settings(broker, topics, categories=["widget"], retry_backoff_max_ms=1000,
                                  request_timeout_ms=5000, **QUIET),
                         scorer=scorer)
    running = WorkerThread(worker).start()
    try:
        wait_for(lambda: worker.pipeline is not None and worker.pipeline.completed >= 20, timeout=60, interval=0.01,
                 what="the worker is busy")
        at_stop = committed_offsets(broker, topics.group, topics.frames)  # a lower bound of what is committed
        in_flight = worker.book.pending()
        if how == "stop":
            broker.stop(timeout_s=1)  # SIGTERM, then SIGKILL after 1 s (tansu does not exit on SIGTERM that fast)
        else:
            crash_during_next_produce(broker, topics.events, monkeypatch)
        time.sleep(3)  # the worker keeps running against a dead broker
        assert running.thread.is_alive(), "the worker stopped while the broker was down"
        broker.start()  # same port, same bucket

        after_restart = committed_offsets(broker, topics.group, topics.frames)  # first: output only grows
        events, letters = outputs(broker, topics)
        assert_commits_covered(after_restart, sent, set(events) | set(letters))

        sent += publish(broker, topics.frames, frames[70:])
        ids = {f.frame_id for f in frames}
        wait_for(lambda: worker.pipeline.completed >= len(frames), timeout=90, interval=0.1,
                 what="the worker to acknowledge every frame after the restart")
    finally:
        result = running.stop(timeout=60)
    assert result.exit_code == 0, result

    events, letters = outputs(broker, topics)
    lost = ids - set(events) - set(letters)
    both = set(events) & set(letters)
    duplicates = {k: len(v) for k, v in events.items() if len(v) > 1}
    where = {s.frame_id: s for s in sent}
    resent = sum("write is unconfirmed" in r.getMessage() for r in caplog.records)  # see kafka_io
    print(f"\nbroker restart: frames in {len(ids)}, events {len(events)}, DLQ {len(letters)}, duplicates "
          f"{sum(n - 1 for n in duplicates.values())}, lost {len(lost)}; in flight at the stop {in_flight}, "
          f"committed at the stop >= {at_stop}, unconfirmed acknowledgements re-sent {resent}")
    assert not lost, f"frames lost: {sorted(lost)}"
    assert not both and not letters, f"good frames dead-lettered: {letters}"
    for frame_id in duplicates:  # only work that was not committed when the broker died may be redone
        sent_at = where[frame_id]
        assert at_stop.get(sent_at.partition) is None or sent_at.offset >= at_stop[sent_at.partition], sent_at
    final = committed_offsets(broker, topics.group, topics.frames)
    assert final == {0: 50, 1: 50}
    assert_commits_covered(final, sent, set(events))


class DuplicateAckOnce:
    """A real producer, except that the first record for ``topic`` is not sent but answered the way
    kafka-python answers a DUPLICATE_SEQUENCE_NUMBER: success with offset -1 (what tansu said for the
    records it lost when it was killed mid-write)."""

    fired: ClassVar[list[str]] = []

    def __init__(self, producer, topic: str) -> None:
        self.producer, self.topic = producer, topic

    def send(self, topic, key=None, value=None, headers=None, **kwargs):
        if topic == self.topic and not self.fired:
            self.fired.append(topic)
            future = Future()
            future.success(RecordMetadata(topic, 0, TopicPartition(topic, 0), -1, -1, None, 0, 0, 0))
            return future
        return self.producer.send(topic, key=key, value=value, headers=headers, **kwargs)

    def __getattr__(self, name):
        return getattr(self.producer, name)


def test_an_acknowledgement_without_offset_is_not_trusted(kafka_broker, make_worker, monkeypatch):
    """Invariant: an output counts as delivered only with an offset; the frame whose event was 'acknowledged'
    as a duplicate but never written still ends as an event, and offsets never pass it before that."""
    topics = new_topics(kafka_broker, partitions=1)
    real = kafka_io.make_producer
    DuplicateAckOnce.fired = []
    monkeypatch.setattr(kafka_io, "make_producer", lambda kwargs: DuplicateAckOnce(real(kwargs), topics.events))
    rng = np.random.default_rng(22)
    frames = [good_frame(rng) for _ in range(6)]
    sent = publish(kafka_broker, topics.frames, frames)
    worker = make_worker(settings(kafka_broker, topics, **QUIET))
    result = worker.run(max_frames=len(frames), timeout=60, install_signals=False)
    assert result.exit_code == 0 and DuplicateAckOnce.fired
    events = events_by_frame(read_all(kafka_broker, topics.events, expected=len(frames)))
    assert set(events) == {f.frame_id for f in frames}, "a frame acknowledged without an offset was lost"
    assert all(len(v) == 1 for v in events.values())
    committed = committed_offsets(kafka_broker, topics.group, topics.frames)
    assert committed == {0: len(frames)}
    assert_commits_covered(committed, sent, set(events))

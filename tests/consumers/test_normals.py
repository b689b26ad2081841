"""The normals sampler against a real broker: what it publishes, and that a missing topic does not hold up
the output thread on every sample."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaProducer

from consumers.normals import NormalsSampler, take_token


def test_token_bucket_refills_at_the_rate_up_to_its_burst():
    ok, bucket = take_token(None, 0.0, 2.0)
    assert ok and bucket.tokens == 1.0
    ok, bucket = take_token(bucket, 0.0, 2.0)
    assert ok and bucket.tokens == 0.0
    ok, bucket = take_token(bucket, 10.0, 2.0)  # 10 s at 2/min: a third of a token
    assert not ok and 0.3 < bucket.tokens < 0.34
    ok, bucket = take_token(bucket, 600.0, 2.0)
    assert ok and bucket.tokens == 1.0  # capped at the burst (2), one taken


@pytest.mark.apache_kafka
def test_missing_topic_pauses_sampling_instead_of_blocking_every_frame(apache_kafka_broker):
    """Apache Kafka without auto-create: the first sample blocks max_block_ms and fails; the next ones are
    skipped at once until the pause ends (doubling), and sampling resumes once the topic exists."""
    topic = f"normals-{uuid.uuid4().hex[:8]}"
    now = [0.0]
    sampler = NormalsSampler(topic, 0.0, 600.0, lambda: KafkaProducer(
        bootstrap_servers=apache_kafka_broker.bootstrap, max_block_ms=300), None, "test",
        clock=lambda: now[0], pause_s=30.0, max_pause_s=60.0)
    try:
        offer = lambda: sampler.offer("widget", 0.1, 0.5, 0, b"cam", b"bytes", [("frame_id", b"f")])  # noqa: E731
        started = time.monotonic()
        assert not offer()  # blocked for metadata, then failed
        assert time.monotonic() - started >= 0.25 and sampler.pauses == 1
        started = time.monotonic()
        for _ in range(5):
            assert not offer()
        assert time.monotonic() - started < 0.25 and sampler.pauses == 1  # skipped, not blocked
        now[0] += 31.0
        assert not offer() and sampler.pauses == 2  # still missing: paused again, for twice as long
        now[0] += 31.0
        assert not offer() and sampler.pauses == 2  # within the 60 s pause
        apache_kafka_broker.create_topic(topic, 1)
        now[0] += 30.0
        deadline = time.monotonic() + 20
        while not offer():
            assert time.monotonic() < deadline, "sampling did not resume once the topic existed"
            now[0] += 61.0
        sampler._producer.flush(10)
        assert sampler.sent == 1
    finally:
        sampler.close()

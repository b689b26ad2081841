"""The embedded broker: starts, creates topics with N partitions, refuses bad requests, leaves no process."""

from __future__ import annotations

import os
import uuid

import pytest
from kafka import KafkaConsumer

from consumers.broker import BrokerError, EmbeddedBroker

pytestmark = pytest.mark.kafka


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_broker_lifecycle_and_topics():
    with EmbeddedBroker() as broker:
        pid = broker.process.pid
        broker.create_topic("three", 3)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            assert consumer.partitions_for_topic("three") == {0, 1, 2}
        finally:
            consumer.close()
        with pytest.raises(BrokerError):
            broker.create_topic("three", 3)
    assert broker.process is None and not alive(pid)
    broker.stop()  # idempotent


def test_failed_start_leaves_nothing(tmp_path):
    broker = EmbeddedBroker(storage="nonsense://nowhere", log_path=tmp_path / "tansu.log")
    with pytest.raises(BrokerError):
        broker.start()
    assert broker.process is None


def test_session_broker_has_a_schema_registry_tansu_only(kafka_broker):
    assert kafka_broker.schema_dir is not None and kafka_broker.schema_dir.is_dir()
    kafka_broker.create_topic(f"x-{uuid.uuid4().hex[:8]}", 2)

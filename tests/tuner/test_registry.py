"""Prompt registry on the real embedded broker: monotonic versions, rollback, corrupt records flagged."""

from __future__ import annotations

import uuid

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from consumers.prompt_records import VERSION_HEADER, record_headers
from consumers.settings import KafkaSettings, connection_kwargs
from hpad.artifact import build_artifact_bytes, read_artifact
from hpad.prompts import PromptSet
from tuner.registry import PromptRegistry, RegistryError

IDENTITY = "hpad-tiny/random-init"


def _artifact(category: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = PromptSet(category=category, source="learned", model_identity=IDENTITY,
                        text_features=torch.nn.functional.normalize(torch.randn(2, 64, generator=g), dim=-1))
    return read_artifact(build_artifact_bytes(prompts, version=1, ctx=torch.randn(2, 4, 64, generator=g)))


@pytest.fixture
def registry(kafka_broker):
    topic = f"prompts-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=1)
    kwargs = connection_kwargs(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap))
    return PromptRegistry(
        topic,
        consumer_factory=lambda: KafkaConsumer(**kwargs, enable_auto_commit=False),
        producer_factory=lambda: KafkaProducer(**kwargs, acks="all"),
        expected_identity=IDENTITY,
    ), kwargs


def test_publish_assigns_monotonic_versions_per_category(registry):
    reg, _ = registry
    assert reg.history() == []
    a1 = reg.publish(_artifact("bottle", 1))
    a2 = reg.publish(_artifact("bottle", 2))
    b1 = reg.publish(_artifact("screw", 3))
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    rows = reg.history()
    assert [(r.category, r.version) for r in rows] == [("bottle", 1), ("bottle", 2), ("screw", 1)]
    latest = reg.latest_valid(rows, "bottle")
    assert latest.artifact.sha256 == a2.sha256
    assert torch.equal(latest.artifact.prompts.text_features, a2.prompts.text_features)


def test_rollback_republishes_old_content_as_newest(registry):
    reg, _ = registry
    v1 = reg.publish(_artifact("bottle", 1))
    reg.publish(_artifact("bottle", 2))
    back = reg.rollback("bottle", 1)
    assert back.version == 3 and back.manifest["rollback_of"] == 1
    assert torch.equal(back.prompts.text_features, v1.prompts.text_features)
    assert reg.latest_valid(reg.history(), "bottle").version == 3
    with pytest.raises(RegistryError, match="valid versions there: \\[1, 2, 3\\]"):
        reg.rollback("bottle", 7)


def test_corrupt_and_foreign_records_are_flagged_not_served(registry):
    reg, kwargs = registry
    good = reg.publish(_artifact("bottle", 1))
    producer = KafkaProducer(**kwargs)
    data = bytearray(build_artifact_bytes(good.prompts, version=2))
    data[-3] ^= 0xFF  # flip a tensor byte: checksum mismatch
    producer.send(reg.topic, key=b"bottle", value=bytes(data), headers=record_headers(good))
    producer.send(reg.topic, key=b"bottle", value=b"not an artifact")
    other = PromptSet(category="bottle", text_features=good.prompts.text_features, model_identity="ViT-B-16/openai")
    producer.send(reg.topic, key=b"bottle", value=build_artifact_bytes(other, version=9),
                  headers=[(VERSION_HEADER, b"9")])
    producer.flush()
    producer.close()
    rows = reg.history("bottle")
    assert len(rows) == 4
    bad = [r for r in rows if r.artifact is None]
    assert len(bad) == 3 and all(r.error for r in bad)
    assert any("checksum" in r.error for r in bad) and any("made for ViT-B-16/openai" in r.error for r in bad)
    assert reg.latest_valid(rows, "bottle").version == 1
    # the next publish still moves past every version number seen, valid or not
    assert reg.publish(_artifact("bottle", 5)).version == 10


def test_missing_topic_is_a_clear_error(kafka_broker):
    kwargs = connection_kwargs(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap))
    reg = PromptRegistry("no-such-topic-" + uuid.uuid4().hex[:6], lambda: KafkaConsumer(**kwargs),
                         lambda: KafkaProducer(**kwargs))
    with pytest.raises(RegistryError, match="does not exist"):
        reg.history()

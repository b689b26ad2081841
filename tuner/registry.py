"""Prompt registry on Kafka: immutable, versioned prompt artifacts on a compacted topic.

Record format (key = category, value = artifact bytes, version / sha256 / model-identity headers): see
`consumers.prompt_records`, shared with the scorers that read the topic. Versions increase monotonically per
category: a publish takes the highest version on the topic + 1 and re-issues the artifact under that number
(the version is part of the checksummed manifest). A rollback republishes an earlier version's content as a new, higher
version (manifest field ``rollback_of``), so every reader only ever moves forward.

Readers keep the newest valid version per category themselves (compaction may lag, and was not verified on
the embedded broker). Set ``min.compaction.lag.ms`` on the real topic long enough to keep the history that
``hpad prompts rollback`` needs; older versions can always be republished from a file with ``publish``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.prompt_records import RegistryRecord, parse_record, record_headers
from hpad.artifact import PromptArtifact, read_artifact, with_version
from hpad.attention import LAAConfig
from hpad.errors import HpadError

log = logging.getLogger(__name__)


class RegistryError(HpadError):
    """The prompts topic cannot be read or written, or a requested version does not exist."""


def read_topic(consumer: KafkaConsumer, topic: str, idle_ms: int = 500, timeout_s: float = 30.0) -> list:
    """Every record of ``topic`` from the beginning (assign, no group). Stops once each partition's position
    reached its end offset and nothing arrived for ``idle_ms`` (end offsets alone are not trusted)."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RegistryError(f"prompts topic {topic!r} does not exist or has no partitions")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)
    records, deadline, last_data = [], time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=100)
        for part in batch.values():
            records.extend(part)
        if batch:
            last_data = time.monotonic()
            continue
        caught_up = all(consumer.position(tp) >= ends[tp] for tp in tps)
        if caught_up and (time.monotonic() - last_data) * 1000 >= idle_ms:
            return records
    raise RegistryError(f"reading prompts topic {topic!r} did not finish within {timeout_s:.0f} s")


class PromptRegistry:
    """Publish / list / roll back prompt versions. Clients come from factories (settings-built kwargs)."""

    def __init__(self, topic: str, consumer_factory: Callable[[], KafkaConsumer],
                 producer_factory: Callable[[], KafkaProducer], expected_identity: str | None = None,
                 send_timeout_s: float = 30.0, expected_laa: LAAConfig | None = None) -> None:
        self.topic = topic
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory
        self.expected_identity = expected_identity
        self.expected_laa = expected_laa
        self.send_timeout_s = send_timeout_s

    def records(self) -> list[RegistryRecord]:
        consumer = self._consumer_factory()
        try:
            return [parse_record(r, self.expected_identity, self.expected_laa) for r in read_topic(consumer, self.topic)]
        finally:
            consumer.close()

    def history(self, category: str | None = None) -> list[RegistryRecord]:
        """Records ordered by category then version (invalid ones included, flagged by ``error``)."""
        rows = [r for r in self.records() if category is None or r.category == category]
        return sorted(rows, key=lambda r: (r.category, r.version, r.offset))

    @staticmethod
    def latest_valid(rows: list[RegistryRecord], category: str) -> RegistryRecord | None:
        valid = [r for r in rows if r.category == category and r.artifact is not None]
        return max(valid, key=lambda r: (r.version, r.offset)) if valid else None

    @staticmethod
    def next_version(rows: list[RegistryRecord], category: str) -> int:
        versions = [r.version for r in rows if r.category == category and r.version > 0]
        return max(versions, default=0) + 1

    def publish(self, artifact: PromptArtifact, **extra: object) -> PromptArtifact:
        """Re-issue ``artifact`` as the category's next version and produce it; returns what was published."""
        rows = self.records()
        category = artifact.prompts.category
        version = self.next_version(rows, category)
        data = with_version(artifact, version, **extra)
        published = read_artifact(data)
        self._send(published, data)
        log.info("published %s version %d (sha256 %s)", category, version, published.sha256[:12])
        return published

    def rollback(self, category: str, to_version: int) -> PromptArtifact:
        rows = self.history(category)
        matches = [r for r in rows if r.version == to_version and r.artifact is not None]
        if not matches:
            known = sorted({r.version for r in rows if r.artifact is not None})
            raise RegistryError(f"version {to_version} of {category!r} is not on {self.topic} "
                                f"(valid versions there: {known or 'none'}); publish it from a file instead")
        return self.publish(matches[-1].artifact, rollback_of=to_version)

    def _send(self, artifact: PromptArtifact, data: bytes) -> None:
        """One record, acknowledged by the broker, or a RegistryError: never a partial publish."""
        producer = self._producer_factory()
        try:
            future = producer.send(self.topic, key=artifact.prompts.category.encode(), value=data,
                                   headers=record_headers(artifact))
            producer.flush(timeout=self.send_timeout_s)
            future.get(timeout=self.send_timeout_s)
        except Exception as exc:  # kafka-python raises KafkaError subclasses and plain timeouts
            raise RegistryError(f"publishing {artifact.prompts.label()} to {self.topic} failed: {exc}") from exc
        finally:
            producer.close(timeout=5)

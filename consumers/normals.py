"""Sampling confidently normal frames for the tuner (``hpad.normals``).

After a frame's event is acknowledged, the output thread offers it here. It is sampled when its score is
below the threshold by at least ``margin`` and the category's token bucket (``per_minute`` tokens per
minute, burst of the same size) has a token. The original bytes and frame headers are re-published
unchanged, minus any ``verified`` header (only operators verify frames) and plus ``hpad-score``,
``hpad-prompt-version`` and ``hpad-sampled-by``.

Sampling is best-effort by design: it never delays or fails the frame's own event. A send that fails is
logged and not counted; the reservoir is a sample anyway. A send that could not even start (the topic is
missing on a broker without auto-create, or unreachable: kafka-python blocks ``max_block_ms`` for its
metadata) pauses sampling for ``pause_s``, doubling up to ``max_pause_s``, so the output thread is not held
up on every sample.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from consumers.metrics import WorkerMetrics

log = logging.getLogger(__name__)
DROPPED_HEADERS = frozenset({"verified", "hpad-score", "hpad-prompt-version", "hpad-sampled-by"})


@dataclass(frozen=True)
class Bucket:
    """Token bucket state: ``tokens`` available at monotonic time ``at``."""

    tokens: float
    at: float


def take_token(bucket: Bucket | None, now: float, per_minute: float) -> tuple[bool, Bucket]:
    """Refill at ``per_minute`` / 60 tokens per second up to a burst of ``max(1, per_minute)``; take one."""
    capacity = max(1.0, per_minute)
    if bucket is None:
        bucket = Bucket(capacity, now)
    tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.at) * per_minute / 60.0)
    if per_minute <= 0 or tokens < 1.0:
        return False, Bucket(tokens, now)
    return True, Bucket(tokens - 1.0, now)


def confidently_normal(score: float, threshold: float, margin: float) -> bool:
    return score < threshold - margin


def sample_headers(headers: list[tuple[str, bytes]] | None, score: float, version: int,
                   sampled_by: str) -> list[tuple[str, bytes]]:
    kept = [(k, v) for k, v in (headers or []) if k.lower() not in DROPPED_HEADERS]
    return [*kept, ("hpad-score", f"{score:.6f}".encode()), ("hpad-prompt-version", str(version).encode()),
            ("hpad-sampled-by", sampled_by.encode("utf-8", "replace"))]


class NormalsSampler:
    """Publishes a bounded sample of confidently normal frames; one instance per worker (output thread)."""

    def __init__(self, topic: str, margin: float, per_minute: float, producer_factory: Callable[[], KafkaProducer],
                 metrics: WorkerMetrics | None, sampled_by: str,
                 clock: Callable[[], float] = time.monotonic, pause_s: float = 30.0,
                 max_pause_s: float = 600.0) -> None:
        self.topic, self.margin, self.per_minute = topic, margin, per_minute
        self.pause_s, self.max_pause_s = pause_s, max_pause_s
        self._paused_until: float | None = None
        self._next_pause = pause_s
        self.pauses = 0
        self._producer_factory = producer_factory
        self._producer: KafkaProducer | None = None
        self.metrics = metrics
        self.sampled_by = sampled_by
        self.clock = clock
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()
        self.sent = 0

    def offer(self, category: str, score: float, threshold: float, version: int, key: bytes | None,
              value: bytes | None, headers: list[tuple[str, bytes]] | None) -> bool:
        """Sample this frame if it qualifies; True when it was handed to the producer."""
        if not value or not confidently_normal(score, threshold, self.margin):
            return False
        if self._paused_until is not None and self.clock() < self._paused_until:
            return False
        with self._lock:
            ok, self._buckets[category] = take_token(self._buckets.get(category), self.clock(), self.per_minute)
        if not ok:
            return False
        try:
            if self._producer is None:
                self._producer = self._producer_factory()
            future = self._producer.send(self.topic, key=key, value=value,
                                         headers=sample_headers(headers, score, version, self.sampled_by))
        except (KafkaError, ValueError, AssertionError) as exc:
            if isinstance(exc, KafkaTimeoutError):  # no metadata for the topic within max_block_ms
                self._paused_until = self.clock() + self._next_pause
                self.pauses += 1
                log.warning("normal sample not sent to %s: %s; is the topic missing (no auto-create)? "
                            "sampling paused for %.0f s", self.topic, exc, self._next_pause)
                self._next_pause = min(self.max_pause_s, self._next_pause * 2)
            else:
                log.warning("normal sample not sent to %s: %s", self.topic, exc)
            return False
        self._next_pause = self.pause_s
        future.add_callback(self._sent, category)
        future.add_errback(lambda exc: log.warning("normal sample to %s failed: %s", self.topic, exc))
        return True

    def _sent(self, category: str, _metadata: object) -> None:
        self.sent += 1
        if self.metrics is not None:
            self.metrics.normals_published.labels(category=category).inc()

    def close(self, timeout_s: float = 5.0) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout_s)
            except KafkaError as exc:
                log.debug("normals producer close: %s", exc)
            self._producer = None

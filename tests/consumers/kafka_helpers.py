"""Helpers for the consumers tests: images, uuid-named topics, publishing frames, reading outputs, offsets.

Tests get the broker-bound ones through the ``kafka`` fixture (tests/conftest.py), a `KafkaTools` on the
broker-parametrised `broker` (tansu and Apache Kafka), instead of importing them across test modules.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.broker import EmbeddedBroker
from consumers.camera import frame_headers
from consumers.settings import WorkerSettings
from consumers.worker import RunResult, Worker

try:
    from tests.synthetic import make_object_image
except ImportError:  # pragma: no cover - the synthetic-data module is optional
    make_object_image = None

FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
# Apache Kafka's defaults refuse FAST_GROUP's 2 s consumer sessions (group.min.session.timeout.ms is 6 s)
KAFKA_TEST_CONFIG = {"group.min.session.timeout.ms": "1000"}


def image(rng: np.random.Generator, size: tuple[int, int] = (64, 80)) -> np.ndarray:
    """An RGB test image [H, W, 3] (a synthetic product photo when tests.synthetic is present)."""
    if make_object_image is not None and min(size) >= 8:
        picture, _ = make_object_image(rng, size)
        return picture
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def encode(picture: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (decompression bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


@dataclass
class Topics:
    frames: str
    events: str
    dlq: str
    group: str


def new_topics(broker: EmbeddedBroker, partitions: int = 3, prefix: str = "t") -> Topics:
    tag = f"{prefix}-{uuid.uuid4().hex[:10]}"
    topics = Topics(f"{tag}.frames", f"{tag}.events", f"{tag}.dlq", f"{tag}.group")
    broker.create_topic(topics.frames, partitions)
    broker.create_topic(topics.events, partitions)
    broker.create_topic(topics.dlq, 1)
    return topics


def settings(broker: EmbeddedBroker, topics: Topics, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap, "input_topic": topics.frames, "events_topic": topics.events,
        "dlq_topic": topics.dlq, "group_id": topics.group, "model": "hpad-tiny", "random_init": True,
        "device": "cpu", "categories": ["widget", "gadget"], "metrics_port": -1, "max_batch_size": 4,
        "revoke_timeout_ms": 5000, "shutdown_timeout_ms": 10000, "retry_backoff_ms": 50,
        "lag_interval_ms": 200, "normals_topic": None, **FAST_GROUP,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@dataclass
class Frame:
    """A frame to publish: value, headers, key. ``frame_id`` is read from the headers."""

    value: bytes | None
    headers: list[tuple[str, bytes]]
    key: bytes | None = None
    partition: int | None = None

    @property
    def frame_id(self) -> str:
        return dict(self.headers).get("frame_id", b"").decode(errors="replace")


def good_frame(rng: np.random.Generator, category: str = "widget", camera: str = "cam-1",
               size: tuple[int, int] = (64, 80), ext: str = ".png") -> Frame:
    frame_id = f"{camera}-{uuid.uuid4().hex[:12]}"
    content = "image/png" if ext == ".png" else "image/jpeg"
    return Frame(encode(image(rng, size), ext), frame_headers(frame_id, camera, category, content), camera.encode())


@dataclass(frozen=True)
class Sent:
    frame_id: str
    partition: int
    offset: int


def publish(broker: EmbeddedBroker, topic: str, frames: list[Frame]) -> list[Sent]:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 * 1024 * 1024, linger_ms=5)
    try:
        futures = [producer.send(topic, key=f.key, value=f.value, headers=f.headers, partition=f.partition)
                   for f in frames]
        producer.flush()
        return [Sent(f.frame_id, fut.get(timeout=30).partition, fut.get(timeout=30).offset)
                for f, fut in zip(frames, futures, strict=True)]
    finally:
        producer.close()


def read_all(broker: EmbeddedBroker, topic: str, expected: int | None = None, timeout: float = 30.0,
             idle: float = 1.0, isolation_level: str = "read_uncommitted") -> list:
    """Every record of ``topic`` (all partitions, from the start): until ``expected`` arrived, or idle."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                             isolation_level=isolation_level, max_partition_fetch_bytes=16 * 1024 * 1024)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
                last_new = time.monotonic()
            if expected is not None and len(records) >= expected:
                # read a little more so that extra (duplicate) records are seen too
                extra_deadline = time.monotonic() + 0.3
                while time.monotonic() < extra_deadline:
                    for recs in consumer.poll(timeout_ms=100).values():
                        records.extend(recs)
                break
            if expected is None and time.monotonic() - last_new > idle:
                break
        return records
    finally:
        consumer.close()


def events_by_frame(records: list) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in records:
        event = json.loads(record.value)
        out.setdefault(event["frame_id"], []).append(event)
    return out


def committed_offsets(broker: EmbeddedBroker, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        return {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        consumer.close(autocommit=False)


def assert_commits_covered(committed: dict[int, int | None], sent: list[Sent], done_ids: set[str]) -> None:
    """The offsets never pass unacknowledged output: every frame below a committed offset has an output."""
    for frame in sent:
        position = committed.get(frame.partition)
        if position is not None and frame.offset < position:
            assert frame.frame_id in done_ids, f"{frame} is below committed offset {position} but has no output"


@dataclass
class WorkerThread:
    """A Worker running `run(**kwargs)` on a thread (signals are not installed off the main thread)."""

    worker: Worker
    kwargs: dict = field(default_factory=dict)
    result: RunResult | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.worker.run(install_signals=False, **self.kwargs)
        except Exception as exc:  # re-raised by join() in the test's thread
            self.error = exc
            raise

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def join(self, timeout: float = 60.0) -> RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop in time"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self, timeout: float = 60.0) -> RunResult:
        self.worker.request_stop()
        return self.join(timeout)


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def reject_schema(broker: EmbeddedBroker, topic: str, category: str | None) -> None:
    """tansu refuses records of ``topic`` whose JSON value has this category (None: every non-JSON value)."""
    if broker.schema_dir is None:
        raise AssertionError(f"{broker.name} has no schema registry: a test that needs one is tansu-only")
    value = {"type": "object"} if category is None else {"properties": {"category": {"not": {"const": category}}}}
    document = {"type": "object", "properties": {"value": value}}
    (broker.schema_dir / f"{topic}.json").write_text(json.dumps(document))


class KafkaTools:
    """The helpers above bound to one broker (the ``kafka`` fixture); ``broker.name`` is "tansu" or "kafka"."""

    def __init__(self, broker) -> None:
        self.broker = broker

    @property
    def name(self) -> str:
        return self.broker.name

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def has_schema_registry(self) -> bool:
        """Only tansu refuses records by schema (`reject_schema`)."""
        return self.broker.schema_dir is not None

    def create_topic(self, name: str, partitions: int = 3) -> None:
        self.broker.create_topic(name, partitions)

    def new_topics(self, partitions: int = 3, prefix: str = "t") -> Topics:
        return new_topics(self.broker, partitions, prefix)

    def settings(self, topics: Topics, **overrides: Any) -> WorkerSettings:
        return settings(self.broker, topics, **overrides)

    def publish(self, topic: str, frames: list[Frame]) -> list[Sent]:
        return publish(self.broker, topic, frames)

    def read_all(self, topic: str, expected: int | None = None, timeout: float = 30.0, idle: float = 1.0,
                 isolation_level: str = "read_uncommitted") -> list:
        return read_all(self.broker, topic, expected, timeout, idle, isolation_level)

    def committed_offsets(self, group: str, topic: str) -> dict[int, int | None]:
        return committed_offsets(self.broker, group, topic)

    def reject_schema(self, topic: str, category: str | None) -> None:
        reject_schema(self.broker, topic, category)

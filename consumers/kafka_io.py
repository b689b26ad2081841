"""kafka-python plumbing shared by the worker, the camera and the demo: clients, checked sends, retries.

`connect` builds a client and retries transient failures (broker not up yet) with capped exponential
backoff until it works or the caller asks to stop. `send` never raises for a per-record problem: it
returns a `Delivery` whose outcome is known after the producer is flushed (a future, or the error
``KafkaProducer.send`` raised at once, e.g. MessageSizeTooLargeError), so callers check every record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Backoff:
    """Capped exponential backoff: first, 2x first, 4x first... up to ``cap`` seconds."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.first_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def is_retriable(exc: BaseException) -> bool:
    """Transient Kafka failures (timeouts, leader moves, broker down) are worth retrying; others are not."""
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


def connect(factory: Callable[[], T], what: str, stop: threading.Event, backoff: Backoff) -> T | None:
    """Call ``factory`` until it succeeds; None when ``stop`` is set first. Non-retriable errors raise."""
    while not stop.is_set():
        try:
            client = factory()
        except KafkaError as exc:
            if not is_retriable(exc):
                raise
            delay = backoff.next_delay()
            log.warning("cannot create Kafka %s yet (%s); retrying in %.1f s", what, exc, delay)
            stop.wait(delay)
            continue
        backoff.reset()
        return client
    return None


def make_consumer(kwargs: dict) -> KafkaConsumer:
    return KafkaConsumer(**kwargs)


def make_producer(kwargs: dict) -> KafkaProducer:
    return KafkaProducer(**kwargs)


class UnconfirmedWriteError(KafkaError):
    """The broker acknowledged a record without an offset: the write cannot be confirmed (retriable).

    kafka-python's idempotent producer turns a DUPLICATE_SEQUENCE_NUMBER answer ("already written") into a
    success with offset -1. A broker whose producer state outlives its log says that for records it never
    stored: tansu 0.6 on s3:// storage, killed between advancing the producer sequence and writing the record
    batch (separate S3 objects), answered the producer's retry that way and four events were lost (found by
    tests/reliability). Re-sending gets new sequence numbers, so the record is written; if it really was
    written before, it is there twice, which at-least-once allows (readers deduplicate by frame_id).

    Kept for Apache Kafka, where it never fires (tests/reliability/test_exactly_once_kafka.py): the broker
    keeps the metadata of each producer's last 5 batches and answers a retried batch among them with error
    NONE and the first write's offset (a producer with at most 5 requests in flight never retries an older
    one); an older sequence is answered OUT_OF_ORDER_SEQUENCE_NUMBER, not DUPLICATE_SEQUENCE_NUMBER, and
    nothing is appended. So on Apache Kafka an acknowledgement always carries its offset and nothing is
    re-sent, while on a broker that answers DUPLICATE_SEQUENCE_NUMBER for a write it did not keep (tansu on
    s3://) the re-send is what saves the record. Under exactly-once the re-send is a retry of the whole
    transaction (aborted first), so it cannot duplicate anything on either broker.
    """

    retriable = True


@dataclass
class Delivery:
    """One record handed to the producer: its future, or the error raised when it was handed over."""

    future: object | None
    error: BaseException | None = None

    def outcome(self, wait_s: float = 0.0, require_offset: bool = False) -> tuple[bool, BaseException | None]:
        """(acknowledged, error). Not acknowledged and no error means still pending after ``wait_s``.
        With ``require_offset`` an acknowledgement without an offset is returned as an `UnconfirmedWriteError`."""
        if self.error is not None:
            return False, self.error
        future = self.future
        deadline = time.monotonic() + wait_s
        while not future.is_done and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.001)
        if not future.is_done:  # type: ignore[union-attr]
            return False, None
        if future.failed():  # type: ignore[union-attr]
            return False, future.exception  # type: ignore[union-attr]
        offset = getattr(future.value, "offset", None)  # type: ignore[union-attr]
        if require_offset and (offset is None or offset < 0):
            return False, UnconfirmedWriteError("acknowledged as a duplicate without an offset; the write is unconfirmed")
        return True, None


def send(producer: KafkaProducer, topic: str, key: bytes | None, value: bytes | None,
         headers: list[tuple[str, bytes]] | None = None) -> Delivery:
    """Hand one record to the producer without raising for per-record errors."""
    try:
        return Delivery(producer.send(topic, key=key, value=value, headers=headers or []))
    except KafkaError as exc:
        return Delivery(None, exc)


def flush(producer: KafkaProducer, timeout_s: float) -> bool:
    """Flush; False (not an exception) when the timeout passed with records still pending."""
    try:
        producer.flush(timeout=timeout_s)
    except KafkaError as exc:
        if not is_retriable(exc):
            raise
        log.warning("producer flush did not finish in %.1f s: %s", timeout_s, exc)
        return False
    return True

"""The output stage: one event or dead letter per frame of a batch, delivered, then marked done.

`OutputStage.run` builds the batch's outputs (`event_record`, `dead_letter`), hands them to the
`consumers.delivery.Deliverer` (at-least-once; or one transaction with the batch's offsets under exactly-once)
and marks each frame done in the `OffsetBook` only once its output is acknowledged. A frame whose partition
moved away meanwhile is abandoned (counted, not sent). The Deliverer swaps an event the broker refuses for
its dead letter through `refusal_handler`, built from the same config and clock as the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from consumers import events as ev
from consumers.delivery import Deliverer, Output
from consumers.items import Batch, FrameItem, PipelineConfig
from consumers.metrics import WorkerMetrics
from consumers.normals import NormalsSampler
from consumers.offsets import OffsetBook

DLQ_HEADROOM = 16 * 1024  # bytes kept free for headers when a dead letter copies the original value


def utc_now() -> datetime:
    return datetime.now(UTC)


def dead_letter(config: PipelineConfig, item: FrameItem, reason: str, message: str, now: datetime) -> Output:
    """The dead letter of ``item``: its original key, value (dropped when it would not fit) and headers."""
    record = item.record
    value = record.value or b""
    truncated = len(value) + len(record.key or b"") + DLQ_HEADROOM > config.max_request_size
    headers = ev.dead_letter_headers(record.headers, reason, message, item.source, record.timestamp,
                                     now, config.worker_name, value_truncated=truncated)
    return Output(item, config.dlq_topic, record.key, b"" if truncated else value, headers, reason=reason)


def refusal_handler(config: PipelineConfig,
                    clock: Callable[[], datetime] = utc_now) -> Callable[[Output, BaseException], Output]:
    """What the `Deliverer` swaps an event the broker refused for: the frame's dead letter."""

    def refused(out: Output, error: BaseException) -> Output:
        reason = "event_too_large" if "TooLarge" in type(error).__name__ else "event_rejected"
        return dead_letter(config, out.item, reason, f"the broker refused the event: {error}", clock())

    return refused


class OutputStage:
    """Builds, sends, flushes and checks the outputs of one batch; marks frames done when acknowledged."""

    def __init__(self, config: PipelineConfig, deliverer: Deliverer | None, metrics: WorkerMetrics,
                 model: ev.ModelInfo, book: OffsetBook, consumer: KafkaConsumer | None = None,
                 clock: Callable[[], datetime] = utc_now,
                 sampler: NormalsSampler | None = None) -> None:
        self.config, self.deliverer, self.metrics, self.model = config, deliverer, metrics, model
        self.book, self.consumer, self.clock, self.sampler = book, consumer, clock, sampler

    # ------------------------------------------------------------------------------ records
    def event_record(self, item: FrameItem) -> Output:
        meta, scored = item.meta, item.scored
        assert meta is not None and scored is not None and item.size is not None
        now = time.monotonic()
        mask = ev.packed_mask_field(item.mask, scored.pixel_threshold) if item.mask is not None else None
        timings = ev.Timings(queue=1000 * (item.infer_start - item.received), decode=1000 * item.decode_s,
                             infer=1000 * item.infer_s, total=1000 * (now - item.received))
        event = ev.build_event(meta, scored, self.model, timings, self.clock(), item.source, item.size, mask,
                               item.batch_id, item.tiles)
        value = ev.encode_event(event)
        item.mask = None
        key = meta.camera_id.encode("utf-8")
        if len(value) + len(key) + 512 > self.config.max_request_size:
            return self.dead_letter(item, "event_too_large", f"event is {len(value)} bytes (mask included), over "
                                    f"the producer's max_request_size {self.config.max_request_size}")
        return Output(item, self.config.events_topic, key, value, [("content-type", b"application/json")])

    def dead_letter(self, item: FrameItem, reason: str, message: str) -> Output:
        return dead_letter(self.config, item, reason, message, self.clock())

    def build(self, batch: Batch) -> list[Output]:
        outs = []
        for item in batch.items:
            if not self.book.is_current(item.tp, item.epoch):
                self.metrics.frames.labels(outcome="abandoned").inc()
                continue
            if item.error is not None:
                outs.append(self.dead_letter(item, item.error.reason, str(item.error)))
            else:
                outs.append(self.event_record(item))
        return outs

    # ------------------------------------------------------------------------------ delivery
    def run(self, batch: Batch) -> int:
        """Deliver every output of ``batch``; returns how many frames were completed (0 when stopping)."""
        start = time.perf_counter()
        outs = self.build(batch)
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - start)
        start = time.perf_counter()
        if self.config.exactly_once:
            delivered = self._deliver_transaction(outs)
        else:
            delivered = self.deliverer.deliver(outs)
            if delivered:
                for out in outs:
                    self.book.done(out.item.tp, out.item.record.offset, out.item.epoch)
        if not delivered:
            return 0  # stopping: nothing of this batch is marked done, so nothing of it is committed
        self.metrics.stage.labels(stage="produce").observe(time.perf_counter() - start)
        self._account(outs)
        return len(outs)

    def _deliver_transaction(self, outs: list[Output]) -> bool:
        """Outputs and the batch's offsets in one transaction. The output thread handles batches in order, so
        once this batch is marked done the committable offsets of its partitions are exactly its end."""
        assert self.consumer is not None
        for out in outs:
            self.book.done(out.item.tp, out.item.record.offset, out.item.epoch)
        tps = {out.item.tp for out in outs}
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self.book.committable().items() if tp in tps}
        if not self.deliverer.deliver_transaction(outs, offsets, self.consumer.group_metadata):
            return False
        self.book.mark_committed({tp: o.offset for tp, o in offsets.items()})
        return True

    # ------------------------------------------------------------------------------ metrics
    def _account(self, outs: list[Output]) -> None:
        now = datetime.now(UTC)
        for out in outs:
            item = out.item
            if out.reason is not None:
                self.metrics.frames.labels(outcome="dead_lettered").inc()
                self.metrics.dead_letters.labels(reason=out.reason).inc()
                continue
            self.metrics.frames.labels(outcome="scored").inc()
            assert item.meta is not None and item.scored is not None
            if item.scored.score >= item.scored.threshold:
                self.metrics.anomalies.labels(category=item.meta.category).inc()
            if item.meta.captured_at is not None:
                self.metrics.latency.observe(max(0.0, (now - item.meta.captured_at).total_seconds()))
            if self.sampler is not None:
                record = item.record
                self.sampler.offer(item.meta.category, item.scored.score, item.scored.threshold,
                                   item.scored.prompt_version, record.key, record.value, record.headers)

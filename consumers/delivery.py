"""Delivering a batch's outputs: send, flush, check every record; isolate records the broker refuses.

`Deliverer.deliver` (at-least-once) sends all outputs, flushes and checks each delivery: acknowledged ones are
done, transient failures are re-sent with backoff, records still pending after a flush are waited for (not
re-sent, which would duplicate them). When the broker refuses a record for good (invalid record, too large),
kafka-python 3.0.12's idempotent producer enters a fatal state and fails everything else it holds too, so
one refusal cannot be told from its collateral: the producer is replaced and the unacknowledged records are
re-sent one at a time ("careful mode") until the refused ones are known. A refused event is swapped for its
dead letter; a refused dead letter stops the worker (`OutputDeliveryError`).

`Deliverer.deliver_transaction` (exactly-once) does the same inside one transaction per batch that also
carries the consumer offsets; any failure aborts the transaction and the batch is sent again (in careful
mode after a refusal, to find and swap the refused record). A fenced producer (another worker initialised the
same transactional id) stops the worker at once (`OutputDeliveryError`), without an abort or a retry: the
broker has aborted its open transaction already.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import InvalidProducerEpochError, KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers import kafka_io
from consumers.items import FrameItem
from consumers.metrics import WorkerMetrics
from hpad.errors import HpadError

log = logging.getLogger(__name__)


def is_fenced(exc: BaseException) -> bool:
    """Another producer took over this transactional id (PRODUCER_FENCED). By the text too: after fencing
    kafka-python 3.0.12 raises a plain KafkaError naming the cause. (INVALID_PRODUCER_EPOCH from a partition
    leader is abortable since KIP-588: the abort that follows answers PRODUCER_FENCED if it really was.)"""
    return isinstance(exc, ProducerFencedError) or "ProducerFencedError" in str(exc)


def _raise_if_transaction_failed(error: BaseException) -> None:
    """A record's error that is the transaction's (fenced, or the producer epoch bumped by the coordinator),
    not the record's: raised, so the batch is aborted (or the worker stops), never dead-lettered for it."""
    if is_fenced(error) or isinstance(error, InvalidProducerEpochError):
        raise error


class OutputDeliveryError(HpadError):
    """Output cannot be delivered (e.g. the dead-letter topic refuses records): stop, commit nothing more."""


class TransactionTimeoutError(OutputDeliveryError):
    """A transaction's commit or abort did not finish in time: the worker stops with it undecided."""


@dataclass(eq=False)
class Output:
    """One output record of a frame: an event, or a dead letter (``reason`` set)."""

    item: FrameItem
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str | None = None
    delivery: kafka_io.Delivery | None = None

    def become(self, other: Output) -> None:
        self.topic, self.key, self.value, self.headers, self.reason = (other.topic, other.key, other.value,
                                                                       other.headers, other.reason)
        self.delivery = None


@dataclass
class Round:
    """Outcome of one send + flush: records to re-send, still pending, refused (with their errors)."""

    retry: list[Output]
    pending: list[Output]
    refused: list[tuple[Output, BaseException]]


class Deliverer:
    """Owns the producer (replaced after a refusal) and delivers batches of outputs."""

    def __init__(self, producer: KafkaProducer, factory: Callable[[], KafkaProducer], metrics: WorkerMetrics,
                 stop: threading.Event, to_dead_letter: Callable[[Output, BaseException], Output],
                 backoff_s: float = 0.2, backoff_max_s: float = 10.0, flush_timeout_s: float = 30.0) -> None:
        self.producer, self.factory, self.metrics, self.stop = producer, factory, metrics, stop
        self.to_dead_letter = to_dead_letter
        self.backoff_s, self.backoff_max_s, self.flush_timeout_s = backoff_s, backoff_max_s, flush_timeout_s

    # ------------------------------------------------------------------------------ primitives
    def _send(self, outs: list[Output]) -> None:
        for out in outs:
            out.delivery = kafka_io.send(self.producer, out.topic, out.key, out.value, out.headers)

    def _round(self, outs: list[Output], waiting: list[Output]) -> Round:
        """Send ``outs``, flush, and classify them and the ``waiting`` ones."""
        self._send(outs)
        kafka_io.flush(self.producer, self.flush_timeout_s)
        result = Round([], [], [])
        for out in [*waiting, *outs]:
            assert out.delivery is not None
            ok, error = out.delivery.outcome(require_offset=True)  # tansu; never on Apache Kafka: kafka_io.UnconfirmedWriteError
            if ok:
                continue
            if error is None:
                result.pending.append(out)
            elif kafka_io.is_retriable(error):
                log.warning("output to %s failed transiently (%s); re-sending", out.topic, error)
                result.retry.append(out)
            else:
                result.refused.append((out, error))
        return result

    def _alone(self, out: Output) -> tuple[str, BaseException | None]:
        """Send one record and wait for it: ('ok' | 'retry' | 'refused', error)."""
        result = self._round([out], [])
        if result.refused:
            return "refused", result.refused[0][1]
        return ("retry", None) if result.retry or result.pending else ("ok", None)

    def _swap(self, out: Output, error: BaseException) -> None:
        """A refused event becomes its dead letter; a refused dead letter is fatal."""
        if out.reason is not None:
            raise OutputDeliveryError(f"dead-letter topic {out.topic} refused the frame at {out.item.source} "
                                      f"({out.reason}): {error}; stopping without committing it")
        log.warning("event of frame at %s refused (%s); dead-lettering it", out.item.source, error)
        out.become(self.to_dead_letter(out, error))

    def replace_producer(self) -> None:
        """After a refusal kafka-python's idempotent producer refuses everything: start a new one."""
        old = self.producer
        backoff = kafka_io.Backoff(self.backoff_s, self.backoff_max_s)
        new = kafka_io.connect(self.factory, "producer", self.stop, backoff)
        if new is None:
            raise OutputDeliveryError("stopped while replacing the producer")
        self.producer = new
        try:
            old.close(timeout=0)
        except KafkaError as exc:
            log.debug("closing the failed producer: %s", exc)

    def _wait(self, backoff: kafka_io.Backoff, kind: str, count: int) -> None:
        self.metrics.retries.labels(kind=kind).inc(count)
        self.stop.wait(backoff.next_delay())

    # ------------------------------------------------------------------------------ at-least-once
    def deliver(self, outs: list[Output]) -> bool:
        """Every output acknowledged (True), or stopping (False: nothing may be committed)."""
        backoff = kafka_io.Backoff(self.backoff_s, self.backoff_max_s)
        result = self._round(outs, [])
        todo, waiting = result.retry, result.pending
        careful = False
        if result.refused:
            self.replace_producer()
            todo, waiting, careful = [o for o, _ in result.refused] + todo + waiting, [], True
        while todo or waiting:
            if self.stop.is_set():
                return False
            if careful:
                todo = self._each(todo)
            else:
                result = self._round(todo, waiting)
                todo, waiting = result.retry, result.pending
            if todo:
                self._wait(backoff, "produce", len(todo))
        return True

    def _each(self, outs: list[Output]) -> list[Output]:
        """Careful mode: one record at a time; returns those to retry later."""
        retry = []
        for out in outs:
            status, error = self._alone(out)
            if status == "refused":
                self.replace_producer()
                assert error is not None
                self._swap(out, error)
                status, error = self._alone(out)
                if status == "refused":
                    self._swap(out, error or KafkaError("refused"))
            if status == "retry":
                retry.append(out)
        return retry

    # ------------------------------------------------------------------------------ exactly-once
    def deliver_transaction(self, outs: list[Output], offsets: dict[TopicPartition, OffsetAndMetadata],
                            group_metadata: Callable[[], object]) -> bool:
        """One transaction: all outputs + ``offsets``; aborted and repeated until it commits (or stop).

        Fenced (another producer initialised the same transactional id): `OutputDeliveryError` at once, never
        an abort or a retry. The broker has already aborted the open transaction, and kafka-python 3.0.12
        refuses every later transactional call (abort included) with a plain KafkaError whose text names
        ProducerFencedError. The fencing can surface on ``commit_transaction``, or earlier on the records'
        futures (AddPartitionsToTxn answered PRODUCER_FENCED), where it must not be taken for a refused
        record (careful mode would dead-letter the batch's events).
        """
        backoff = kafka_io.Backoff(self.backoff_s, self.backoff_max_s)
        careful = False
        while not self.stop.is_set():
            try:
                self.producer.begin_transaction()
                if careful:
                    sent = self._each_in_transaction(outs)
                else:
                    result = self._round(outs, [])
                    for _, error in result.refused:
                        _raise_if_transaction_failed(error)
                    sent = not (result.retry or result.pending or result.refused)
                    careful = bool(result.refused)
                if sent:
                    if offsets:
                        self.producer.send_offsets_to_transaction(offsets, group_metadata())
                    self._end_transaction(commit=True)
                    return True
            except KafkaError as exc:
                if is_fenced(exc):
                    raise OutputDeliveryError(f"transactional producer fenced (another worker took over): {exc}; "
                                              "stopping without committing the batch") from exc
                log.warning("transaction failed (%s); aborting and retrying", exc)
            except TransactionTimeoutError:
                raise  # undecided: an abort now is refused (kafka-python is still committing)
            except OutputDeliveryError:
                self._abort()
                raise
            self._abort()
            self._wait(backoff, "transaction", 1)
        return False

    def _each_in_transaction(self, outs: list[Output]) -> bool:
        """Careful mode inside a transaction: stop at the first failure (swapping a refused event)."""
        for out in outs:
            status, error = self._alone(out)
            if status == "refused":
                assert error is not None
                _raise_if_transaction_failed(error)
                self._swap(out, error)
                return False
            if status == "retry":
                return False
        return True

    def _abort(self) -> None:
        try:
            self._end_transaction(commit=False)
        except KafkaError as exc:
            what = "transactional producer fenced (another worker took over)" if is_fenced(exc) else \
                "cannot abort the transaction"
            raise OutputDeliveryError(f"{what}: {exc}") from exc

    def _end_transaction(self, commit: bool) -> None:
        """Commit or abort, waiting at most ``flush_timeout_s``. kafka-python 3.0.12's commit_transaction and
        abort_transaction wait without a deadline (max_block_ms does not apply): with the broker killed during
        a commit, commit_transaction was still blocked 150 s after the broker was back, and the worker, whose
        main loop goes on polling (and looking healthy), would never deliver again. Past the deadline the
        worker stops (`OutputDeliveryError`) with the transaction undecided: its restart (same transactional
        id) makes the coordinator finish or abort it, and nothing of the batch is committed until then."""
        manager = getattr(self.producer, "_transaction_manager", None)
        sender = getattr(self.producer, "_sender", None)
        begin = getattr(manager, "begin_commit" if commit else "begin_abort", None)
        if begin is None or sender is None:  # another client (or a test double): its own public call
            (self.producer.commit_transaction if commit else self.producer.abort_transaction)()
            return
        result = begin()
        sender.wakeup()
        if not result.wait(timeout_ms=int(self.flush_timeout_s * 1000)):  # raises the transaction's error
            raise TransactionTimeoutError(f"the transaction's {'commit' if commit else 'abort'} did not finish in "
                                      f"{self.flush_timeout_s:.0f} s (broker unreachable?); stopping with it "
                                      "undecided: a restarted worker with the same transactional id resolves it")

    def close(self, timeout_s: float) -> None:
        try:
            self.producer.close(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("producer close: %s", exc)

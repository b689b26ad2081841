"""The scoring worker: consumer-group loop, adaptive batching, at-least-once commits, rebalances, shutdown.

Loop (main thread): poll -> admit records (header checks, decode submitted) -> form a batch -> dispatch to
the `Pipeline` -> commit what the output stage acknowledged. A batch is dispatched when it is full, when
its first frame waited ``max_wait_ms``, or at once when the scorer is idle (so batches grow with load and
latency stays low when the line is quiet). When the pipeline is full the worker pauses its partitions and
keeps polling, so ``max_poll_interval_ms`` never expires because of a slow batch.

Commits: `OffsetBook` gives, per partition, one past the longest prefix of acknowledged frames; nothing is
committed for a frame whose event or dead letter was not acknowledged. With ``exactly_once`` the offsets
travel inside each batch's transaction instead (see `consumers.pipeline`).

Rebalances (listener runs on kafka-python's IO thread while the main thread is inside ``poll``):
revoked -> wait (bounded) for in-flight batches, commit what is done, forget the partitions, remember where
to seek if one comes back; lost -> forget the partitions at once (their in-flight work is dropped);
assigned -> seek the partitions that came back.

Stop (SIGTERM/SIGINT, ``max_frames``, ``timeout``): stop polling, finish in-flight batches, commit, close.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.future import Future as KafkaFuture
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers import kafka_io
from consumers.contract import Limits
from consumers.events import ModelInfo
from consumers.metrics import Health, WorkerMetrics
from consumers.normals import NormalsSampler
from consumers.offsets import OffsetBook, partition_lag
from consumers.pipeline import FrameItem, Pipeline, PipelineConfig
from consumers.prompt_provider import PromptProvider
from consumers.settings import WorkerSettings, consumer_kwargs, producer_kwargs
from hpad.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """How `Worker.run` ended. ``exit_code`` 0: clean stop; 1: fatal output error (see ``error``)."""

    exit_code: int
    reason: str  # max_frames, timeout, signal, stop, fatal
    completed: int
    drained: bool
    error: str | None = None


def worker_name(client_id: str) -> str:
    return f"{client_id}@{socket.gethostname()}:{os.getpid()}"


def pipeline_config(s: WorkerSettings, name: str) -> PipelineConfig:
    return PipelineConfig(
        events_topic=s.events_topic, dlq_topic=s.dlq_topic, worker_name=name,
        limits=Limits(s.max_payload_bytes, s.max_pixels, s.max_side, s.min_side),
        default_category=s.default_category, mask_policy=s.mask_policy,
        max_request_size=s.producer_max_request_size, exactly_once=s.exactly_once,
        pipeline_depth=s.pipeline_depth, decode_threads=s.decode_threads, decode_scale=s.decode_scale,
        gpu_decode=s.gpu_decode, oom_retries=s.oom_retries,
        retry_backoff_s=s.retry_backoff_ms / 1000, retry_backoff_max_s=s.retry_backoff_max_ms / 1000,
        flush_timeout_s=s.request_timeout_ms / 1000,
    )


class _Rebalance(AsyncConsumerRebalanceListener):
    """Async listener: awaiting keeps kafka-python's IO loop (and heartbeats) running while we drain."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assigned(set(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.worker.lost(set(lost))


class Worker:
    """One scoring worker process (or thread, in tests): consumer + producer + pipeline."""

    def __init__(self, settings: WorkerSettings, scorer: Scorer, provider: PromptProvider, model: ModelInfo,
                 metrics: WorkerMetrics | None = None, health: Health | None = None) -> None:
        self.settings = settings
        self.scorer = scorer
        self.provider = provider
        self.model = model
        self.metrics = metrics or WorkerMetrics()
        self.health = health or Health(settings.liveness_timeout_ms / 1000)
        self.health.model_loaded = True
        self.book = OffsetBook()
        self.stop_event = threading.Event()
        self.stop_reason = "stop"
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.pipeline: Pipeline | None = None
        self.sampler: NormalsSampler | None = None
        self._rewind: dict[TopicPartition, int] = {}
        self._rewind_lock = threading.Lock()
        self._group_committed: dict[TopicPartition, int | None] = {}
        self._rebalances = 0
        self._closing = False
        self.rebalance_log: list[tuple[str, frozenset[TopicPartition]]] = []  # (revoked|assigned|lost, tps)
        self._next_commit = 0.0
        self._next_lag = 0.0
        self._commit_backoff = kafka_io.Backoff(settings.retry_backoff_ms / 1000, settings.retry_backoff_max_ms / 1000)
        self.name = worker_name(settings.client_id)
        self._publish_static_metrics()

    # ------------------------------------------------------------------------------ public
    def request_stop(self, reason: str = "stop") -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    def run(self, max_frames: int | None = None, timeout: float | None = None,
            install_signals: bool | None = None) -> RunResult:
        """Consume until stopped (signal, `request_stop`), ``max_frames`` completed, or ``timeout`` seconds."""
        if install_signals is None:
            install_signals = threading.current_thread() is threading.main_thread()
        previous = self._install_signals() if install_signals else {}
        try:
            self.provider.start(wait_s=self.settings.request_timeout_ms / 1000)  # newest prompt versions first
            if not self._connect():
                return RunResult(0, self.stop_reason, 0, True)
            deadline = None if timeout is None else time.monotonic() + timeout
            reason = self._loop(max_frames, deadline)
            return self._shutdown(reason)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.provider.close()
            if self.pipeline is not None and not self.pipeline.stopped:
                self.pipeline.hard_stop.set()
                self.pipeline.stop(timeout_s=5)
            self._close_clients()

    # ------------------------------------------------------------------------------ start / stop
    def _publish_static_metrics(self) -> None:
        m = self.model
        self.metrics.set_model(m.model, m.weights, m.random_weights, m.device, m.precision)
        snapshot = self.provider.snapshot()
        for category in snapshot:
            self.metrics.set_prompt(category, snapshot[category].version, snapshot[category].source)

    def _install_signals(self) -> dict[int, object]:
        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stop_event.is_set() and self.pipeline is not None:
                log.warning("second %s: abandoning in-flight batches (they stay uncommitted)", name)
                self.pipeline.hard_stop.set()
                return
            log.info("received %s: finishing in-flight batches, committing, closing", name)
            self.request_stop("signal")

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _connect(self) -> bool:
        s = self.settings
        backoff = kafka_io.Backoff(s.retry_backoff_ms / 1000, s.retry_backoff_max_ms / 1000)
        txn_id = None
        if s.exactly_once:
            txn_id = s.transactional_id or f"{s.client_id}-{os.urandom(6).hex()}"

        def new_producer() -> KafkaProducer:
            return kafka_io.make_producer(producer_kwargs(s, txn_id))

        self.producer = kafka_io.connect(new_producer, "producer", self.stop_event, backoff)
        if self.producer is None:
            return False
        if txn_id is not None:
            self.producer.init_transactions()
            log.info("exactly-once: transactional id %s (readers of %s must use read_committed)", txn_id,
                     s.events_topic)
        self.consumer = kafka_io.connect(lambda: kafka_io.make_consumer(consumer_kwargs(s)), "consumer",
                                         self.stop_event, backoff)
        if self.consumer is None:
            return False
        self.consumer.subscribe([s.input_topic], listener=_Rebalance(self))
        self.sampler = None
        if s.normals_topic is not None and s.normals_per_minute > 0:
            self.sampler = NormalsSampler(
                s.normals_topic, s.normals_margin, s.normals_per_minute,
                lambda: kafka_io.make_producer({**producer_kwargs(s), "max_block_ms": 2000}), self.metrics, self.name)
        self.pipeline = Pipeline(pipeline_config(s, self.name), self.scorer, self.provider, self.book, self.producer,
                                 new_producer, self.metrics, self.model, self.consumer, self.sampler)
        self.pipeline.start()
        log.info("worker %s consuming %s as group %s (model %s, weights %s)", self.name, s.input_topic,
                 s.group_id, self.model.identity, "RANDOM" if self.model.random_weights else self.model.weights)
        return True

    def _shutdown(self, reason: str) -> RunResult:
        """Finish in-flight batches, commit, stop the pipeline (clients are closed by `run`)."""
        assert self.pipeline is not None
        drained = self.pipeline.wait_idle(self.settings.shutdown_timeout_ms / 1000)
        if not drained:
            log.warning("in-flight batches did not finish in %d ms; they stay uncommitted",
                        self.settings.shutdown_timeout_ms)
            self.pipeline.hard_stop.set()
        for _ in range(3):
            if self._commit(force=True):
                break
            time.sleep(self.settings.retry_backoff_ms / 1000)
        self.pipeline.stop()
        fatal = self.pipeline.fatal
        if fatal is not None:
            log.error("worker stopped on a fatal error: %s", fatal)
            return RunResult(1, "fatal", self.pipeline.completed, drained, f"{type(fatal).__name__}: {fatal}")
        return RunResult(0, reason, self.pipeline.completed, drained)

    def _close_clients(self) -> None:
        self._closing = True  # the revoke listener that close() triggers must not wait for the pipeline
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as exc:
                log.warning("consumer close: %s", exc)
        if self.sampler is not None:
            self.sampler.close()
        if self.pipeline is not None:  # the pipeline may have replaced the producer
            self.pipeline.deliverer.close(self.settings.request_timeout_ms / 1000)
        elif self.producer is not None:
            try:
                self.producer.close(timeout=self.settings.request_timeout_ms / 1000)
            except KafkaError as exc:
                log.warning("producer close: %s", exc)

    # ------------------------------------------------------------------------------ main loop
    def _stop_reason(self, max_frames: int | None, deadline: float | None) -> str | None:
        assert self.pipeline is not None
        if self.stop_event.is_set():
            return self.stop_reason
        if self.pipeline.fatal is not None:
            return "fatal"
        if max_frames is not None and self.pipeline.completed >= max_frames:
            return "max_frames"
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        return None

    def _loop(self, max_frames: int | None, deadline: float | None) -> str:
        assert self.pipeline is not None and self.consumer is not None
        s = self.settings
        forming: list[FrameItem] = []
        rebalances = self._rebalances
        while (reason := self._stop_reason(max_frames, deadline)) is None:
            self.health.beat()
            self.metrics.heartbeat.set_to_current_time()
            self._commit()
            self._update_lag()
            room = self.pipeline.has_room()
            full = len(forming) >= s.max_batch_size
            self._set_paused(full and not room)
            blocked = bool(forming) and not room and self._batch_ready(forming)
            forming += self._poll(self._poll_timeout_ms(forming, blocked), 1 if full else s.max_batch_size - len(forming))
            if rebalances != self._rebalances:
                rebalances = self._rebalances
                forming = [i for i in forming if self.book.is_current(i.tp, i.epoch)]
            if forming and self.pipeline.has_room() and self._batch_ready(forming):
                self.pipeline.dispatch(forming[: s.max_batch_size])
                forming = forming[s.max_batch_size :]
            elif blocked:
                self.pipeline.wait_room(0.05)  # the scorer is busy: sleep until it takes a batch (no spinning)
            self.metrics.inflight.set(self.book.pending())
        if forming:
            log.info("stopping: %d polled frames not started stay uncommitted", len(forming))
        return reason

    def _poll_timeout_ms(self, forming: list[FrameItem], blocked: bool) -> int:
        """0 when a batch waits for the scorer (then `Pipeline.wait_room` sleeps); else until the batch is due."""
        if blocked:
            return 0
        if not forming:
            return 100
        waited_ms = 1000 * (time.monotonic() - forming[0].received)
        return int(min(50, max(1, self.settings.max_wait_ms - waited_ms)))

    def _batch_ready(self, forming: list[FrameItem]) -> bool:
        assert self.pipeline is not None
        waited_ms = 1000 * (time.monotonic() - forming[0].received)
        return (len(forming) >= self.settings.max_batch_size or waited_ms >= self.settings.max_wait_ms
                or self.pipeline.idle())

    def _poll(self, timeout_ms: int, limit: int) -> list[FrameItem]:
        assert self.consumer is not None and self.pipeline is not None
        try:
            records = self.consumer.poll(timeout_ms=timeout_ms, max_records=max(1, limit))
        except KafkaError as exc:
            self.metrics.retries.labels(kind="poll").inc()
            log.warning("poll failed (%s); retrying", exc)
            self.stop_event.wait(self.settings.retry_backoff_ms / 1000)
            return []
        items = []
        for tp, batch in records.items():
            for record in batch:
                items.append(self.pipeline.admit(record, tp, self._track(tp, record.offset)))
        return items

    def _track(self, tp: TopicPartition, offset: int) -> int:
        try:
            return self.book.track(tp, offset)
        except ValueError:
            log.warning("%s went back to offset %d (reset by the broker?); restarting its tracking", tp, offset)
            self.book.release({tp})
            self._rebalances += 1
            return self.book.track(tp, offset)

    def _set_paused(self, pause: bool) -> None:
        assert self.consumer is not None
        if pause:
            assigned = self.consumer.assignment()
            if assigned and assigned != self.consumer.paused():
                self.consumer.pause(*assigned)
        elif paused := self.consumer.paused():
            self.consumer.resume(*paused)

    # ------------------------------------------------------------------------------ commits and lag
    def _commit(self, force: bool = False) -> bool:
        """Commit acknowledged progress (main thread). False when a commit failed (retried later)."""
        assert self.consumer is not None
        if self.settings.exactly_once:
            return True
        now = time.monotonic()
        if not force and now < self._next_commit:
            return False
        offsets = self.book.committable()
        if not offsets:
            return True
        start = time.perf_counter()
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except KafkaError as exc:
            self.metrics.commits.labels(result="failed").inc()
            self._next_commit = now + self._commit_backoff.next_delay()
            log.warning("offset commit failed (%s); will retry", exc)
            return False
        self._commit_backoff.reset()
        self.metrics.stage.labels(stage="commit").observe(time.perf_counter() - start)
        self.metrics.commits.labels(result="ok").inc()
        self.book.mark_committed(offsets)
        return True

    def _update_lag(self) -> None:
        assert self.consumer is not None
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self.settings.lag_interval_ms / 1000
        lags: dict[tuple[str, int], int] = {}
        try:
            for tp in self.consumer.assignment():
                lag = partition_lag(self.consumer.highwater(tp), self.consumer.position(tp, timeout_ms=200),
                                    self._committed_offset(tp))
                if lag is not None:
                    lags[(tp.topic, tp.partition)] = lag
        except KafkaError as exc:
            log.debug("lag not updated: %s", exc)
            return
        self.metrics.set_lag(lags)

    def _committed_offset(self, tp: TopicPartition) -> int | None:
        mine = self.book.committed(tp)
        if mine is not None:
            return mine
        if tp not in self._group_committed:
            assert self.consumer is not None
            self._group_committed[tp] = self.consumer.committed(tp, timeout_ms=5000)
        return self._group_committed[tp]

    # ------------------------------------------------------------------------------ rebalance (IO thread)
    def release(self, revoked: set[TopicPartition]) -> KafkaFuture:
        """Partitions are being revoked: drain, commit what is done, forget them. Returns an awaitable
        kafka Future that resolves on kafka-python's IO thread (through the commit) once that is done."""
        result = KafkaFuture()
        self._rebalances += 1
        self.rebalance_log.append(("revoked", frozenset(revoked)))
        self.health.assigned = 0
        if not revoked or self.pipeline is None or self.consumer is None:
            result.success(None)
            return result
        threading.Thread(target=self._release_work, args=(revoked, result), name="hpad-revoke", daemon=True).start()
        return result

    def _release_work(self, revoked: set[TopicPartition], result: KafkaFuture) -> None:
        assert self.pipeline is not None and self.consumer is not None
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        try:
            if not self._closing and not self.pipeline.wait_idle(self.settings.revoke_timeout_ms / 1000):
                log.warning("revoke: in-flight batches did not finish in %d ms; their frames stay uncommitted",
                            self.settings.revoke_timeout_ms)
            released = self.book.release(revoked)
            with self._rewind_lock:
                self._rewind.update(released.rewind)
            for tp in revoked:
                self._group_committed.pop(tp, None)
            if not self.settings.exactly_once:
                offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in released.commit.items()}
        finally:
            self._commit_on_io_thread(offsets, result)

    def _commit_on_io_thread(self, offsets: dict[TopicPartition, OffsetAndMetadata], result: KafkaFuture) -> None:
        """commit_async is scheduled thread-safely on the IO loop; its completion resolves ``result`` there."""
        assert self.consumer is not None

        def finished(value: object) -> None:
            if isinstance(value, BaseException):
                self.metrics.commits.labels(result="failed").inc()
                log.warning("commit on revoke failed (%s): those frames will be processed again", value)
            elif offsets:
                self.metrics.commits.labels(result="ok").inc()
                log.info("committed %s on revoke", {f"{tp.topic}[{tp.partition}]": o.offset for tp, o in offsets.items()})
            result.success(None)

        try:
            self.consumer.commit_async(offsets).add_both(finished)
        except KafkaError as exc:
            finished(exc)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions arrived: those that came back are rewound to their first unfinished record."""
        assert self.consumer is not None
        self.rebalance_log.append(("assigned", frozenset(assigned)))
        with self._rewind_lock:
            for tp in assigned & set(self._rewind):
                self.consumer.seek(tp, self._rewind[tp])
                log.info("%s came back: seeking to %d", tp, self._rewind[tp])
            self._rewind.clear()
        self.health.assigned = len(assigned)
        self.metrics.assigned.set(len(assigned))
        self.metrics.ready.set(1 if self.health.ready() else 0)
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    def lost(self, lost: set[TopicPartition]) -> None:
        """Membership lost: drop in-flight work of these partitions; the new owner reads them again."""
        self._rebalances += 1
        self.rebalance_log.append(("lost", frozenset(lost)))
        self.book.release(lost)
        for tp in lost:
            self._group_committed.pop(tp, None)
        self.health.assigned = 0
        self.metrics.assigned.set(0)
        self.metrics.ready.set(0)
        log.warning("lost partitions %s (session expired?): their in-flight frames are dropped", sorted(lost))

"""The scoring worker: consumer-group loop, adaptive batching, at-least-once commits, rebalances, shutdown.

Loop (main thread, `Worker._loop`): poll -> admit records (header checks, decode submitted) -> form a batch
(`consumers.batching`: full, first frame waited ``max_wait_ms``, or the scorer idle) -> dispatch to the
`Pipeline` -> commit what the output stage acknowledged (`consumers.checkpoint`). When the pipeline is full
the worker pauses its partitions and keeps polling, so ``max_poll_interval_ms`` never expires because of a
slow batch.

Commits: `consumers.checkpoint.Checkpoint` (the `OffsetBook`: nothing is committed for a frame whose event or
dead letter was not acknowledged; with ``exactly_once`` the offsets travel inside each batch's transaction).
Rebalances: `consumers.rebalance.Rebalancer` (drain and commit on revoke, drop on loss, seek on return).

Stop (SIGTERM/SIGINT, ``max_frames``, ``timeout``): stop polling, finish in-flight batches, commit, close.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from consumers import kafka_io
from consumers.batching import BatchFormer
from consumers.checkpoint import Checkpoint
from consumers.contract import Limits
from consumers.events import ModelInfo
from consumers.items import FrameItem, PipelineConfig
from consumers.metrics import Health, WorkerMetrics
from consumers.normals import NormalsSampler
from consumers.offsets import OffsetBook
from consumers.pipeline import Pipeline
from consumers.prompt_provider import PromptProvider
from consumers.rebalance import Rebalancer
from consumers.service import Stoppable, stop_signals
from consumers.settings import WorkerSettings, consumer_kwargs, producer_kwargs
from hpad.errors import ConfigError
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
        gpu_decode=s.gpu_decode, tiling=s.tiling_policy, oom_retries=s.oom_retries,
        retry_backoff_s=s.retry_backoff_ms / 1000, retry_backoff_max_s=s.retry_backoff_max_ms / 1000,
        flush_timeout_s=s.request_timeout_ms / 1000,
    )


class Worker(Stoppable):
    """One scoring worker process (or thread, in tests): consumer + producer + pipeline."""

    def __init__(self, settings: WorkerSettings, scorer: Scorer, provider: PromptProvider, model: ModelInfo,
                 metrics: WorkerMetrics | None = None, health: Health | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.scorer = scorer
        self.provider = provider
        self.model = model
        self.metrics = metrics or WorkerMetrics()
        self.health = health or Health(settings.liveness_timeout_ms / 1000)
        self.health.model_loaded = True
        self.book = OffsetBook()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.pipeline: Pipeline | None = None
        self.sampler: NormalsSampler | None = None
        self.checkpoint: Checkpoint | None = None
        self.rebalance: Rebalancer | None = None
        self.metadata_watch: kafka_io.MetadataWatch | None = None
        self._next_lag = 0.0
        self.name = worker_name(settings.client_id)
        self._publish_static_metrics()

    @property
    def rebalance_log(self) -> list[tuple[str, frozenset[TopicPartition]]]:
        """(revoked|assigned|lost, partitions) of every rebalance so far."""
        return [] if self.rebalance is None else self.rebalance.log

    # ------------------------------------------------------------------------------ public
    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Hook, called when partitions arrive, before `Rebalancer.assigned` seeks them (benchmarks/host.py
        times the group join with it); does nothing here."""

    def run(self, max_frames: int | None = None, timeout: float | None = None,
            install_signals: bool | None = None) -> RunResult:
        """Consume until stopped (signal, `request_stop`), ``max_frames`` completed, or ``timeout`` seconds."""
        with stop_signals(self._on_signal, install_signals):
            try:
                self.provider.start(wait_s=self.settings.request_timeout_ms / 1000)  # newest prompt versions first
                if not self._connect():
                    return RunResult(0, self.stop_reason, 0, True)
                deadline = None if timeout is None else time.monotonic() + timeout
                reason = self._loop(max_frames, deadline)
                return self._shutdown(reason)
            finally:
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

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop_event.is_set() and self.pipeline is not None:
            log.warning("second %s: abandoning in-flight batches (they stay uncommitted)", name)
            self.pipeline.hard_stop.set()
            return
        log.info("received %s: finishing in-flight batches, committing, closing", name)
        self.request_stop("signal")

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
        self.sampler = None
        if s.normals_topic is not None and s.normals_per_minute > 0:
            self.sampler = NormalsSampler(
                s.normals_topic, s.normals_margin, s.normals_per_minute,
                lambda: kafka_io.make_producer({**producer_kwargs(s), "max_block_ms": 2000}), self.metrics, self.name)
        self.pipeline = Pipeline(pipeline_config(s, self.name), self.scorer, self.provider, self.book, self.producer,
                                 new_producer, self.metrics, self.model, self.consumer, self.sampler)
        self.checkpoint = Checkpoint(self.book, self.consumer, self.metrics, s.exactly_once,
                                     kafka_io.Backoff(s.retry_backoff_ms / 1000, s.retry_backoff_max_ms / 1000))
        self.rebalance = Rebalancer(self.consumer, self.checkpoint, self.pipeline, self.health, self.metrics,
                                    s.revoke_timeout_ms / 1000, on_assigned=self.assigned)
        self.consumer.subscribe([s.input_topic], listener=self.rebalance)
        self.metadata_watch = kafka_io.MetadataWatch(self.consumer, [s.input_topic])
        self.pipeline.start()
        log.info("worker %s consuming %s as group %s (model %s, weights %s)", self.name, s.input_topic,
                 s.group_id, self.model.identity, "RANDOM" if self.model.random_weights else self.model.weights)
        return True

    def _shutdown(self, reason: str) -> RunResult:
        """Finish in-flight batches, commit, stop the pipeline (clients are closed by `run`)."""
        assert self.pipeline is not None and self.checkpoint is not None
        drained = self.pipeline.wait_idle(self.settings.shutdown_timeout_ms / 1000)
        if not drained:
            log.warning("in-flight batches did not finish in %d ms; they stay uncommitted",
                        self.settings.shutdown_timeout_ms)
            self.pipeline.hard_stop.set()
        self.checkpoint.commit_final(attempts=3, wait_s=self.settings.retry_backoff_ms / 1000)
        self.pipeline.stop()
        fatal = self.pipeline.fatal
        if fatal is not None:
            log.error("worker stopped on a fatal error: %s", fatal)
            return RunResult(1, "fatal", self.pipeline.completed, drained, f"{type(fatal).__name__}: {fatal}")
        return RunResult(0, reason, self.pipeline.completed, drained)

    def _close_clients(self) -> None:
        if self.rebalance is not None:  # the revoke listener that close() triggers must not wait for the pipeline
            self.rebalance.closing = True
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
        """poll -> admit -> form a batch -> dispatch -> commit, until a stop reason."""
        pipeline, checkpoint, rebalance = self.pipeline, self.checkpoint, self.rebalance
        assert pipeline is not None and checkpoint is not None and rebalance is not None
        # the batch's size counts tiles (a tiled frame costs the model its tiles), so batches stay full
        batch: BatchFormer[FrameItem] = BatchFormer(self.settings.max_batch_size, self.settings.max_wait_ms,
                                                    weight=lambda item: item.tiles)
        changes = rebalance.changes
        while (reason := self._stop_reason(max_frames, deadline)) is None:
            self.health.beat()
            self.metrics.heartbeat.set_to_current_time()
            room = pipeline.has_room()
            self._set_paused(batch.full() and not room)  # the scorer is behind: keep polling, fetch nothing
            blocked = not room and batch.ready(pipeline.idle())
            batch.add(self._poll(batch.poll_timeout_ms(blocked), batch.poll_limit()))  # poll + admit
            if changes != rebalance.changes:  # partitions moved: drop their frames
                changes = rebalance.changes
                batch.keep(lambda item: self.book.is_current(item.tp, item.epoch))
            if pipeline.has_room() and batch.ready(pipeline.idle()):
                pipeline.dispatch(batch.take())
            elif blocked:
                pipeline.wait_room(0.05)  # the scorer is busy: sleep until it takes a batch (no spinning)
            checkpoint.commit()  # what the output stage acknowledged so far (throttled after a failure)
            if self.metadata_watch is not None:  # assigned nothing for want of metadata: refresh it
                self.metadata_watch.check()
            self._update_lag()
            self.metrics.inflight.set(self.book.pending())
        if len(batch):
            log.info("stopping: %d polled frames not started stay uncommitted", len(batch))
        return reason

    def _poll(self, timeout_ms: int, limit: int) -> list[FrameItem]:
        """Poll, and admit what came (header checks, decode submitted)."""
        assert self.consumer is not None and self.pipeline is not None
        try:
            records = self.consumer.poll(timeout_ms=timeout_ms, max_records=max(1, limit))
        except kafka_io.FATAL_GROUP_ERRORS as exc:  # retrying cannot help: a setting or the broker's ACLs must change
            raise ConfigError(kafka_io.group_error_message(exc, self.settings.group_id,
                                                     self.settings.session_timeout_ms)) from exc
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
            assert self.rebalance is not None
            self.rebalance.reset(tp, offset)
            return self.book.track(tp, offset)

    def _set_paused(self, pause: bool) -> None:
        assert self.consumer is not None
        if pause:
            assigned = self.consumer.assignment()
            if assigned and assigned != self.consumer.paused():
                self.consumer.pause(*assigned)
        elif paused := self.consumer.paused():
            self.consumer.resume(*paused)

    def _update_lag(self) -> None:
        assert self.checkpoint is not None
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self.settings.lag_interval_ms / 1000
        try:
            lags = self.checkpoint.lags()
        except KafkaError as exc:
            log.debug("lag not updated: %s", exc)
            return
        self.metrics.set_lag(lags)

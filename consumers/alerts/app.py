"""``hpad alerts``: debounced anomaly alerts from the events topic to Alertmanager and a webhook.

Main loop (one thread): re-send firing alerts that are due -> poll the events topic (group
``HPAD_GROUP_ID``) -> feed each event to its line's rule -> deliver the batch's notifications (Alertmanager
first, then the webhook, dead letters for webhook notifications that failed every attempt) -> commit the
batch's offsets. **At-least-once**: offsets move only after every sink acknowledged; after a crash the
uncommitted tail is processed again and the same notifications are sent again, with the same labels
(Alertmanager keeps one alert) and the same idempotency keys (webhook receivers drop the repeat).

**State after a restart or a rebalance**: on assignment, each partition is re-read from
``HPAD_ALERTS_REPLAY_RECORDS`` events before its committed offset up to that offset with notifications
suppressed (they were delivered before the commit), which rebuilds windows, open episodes and cooldowns
exactly (the rule uses event time only). Open episodes are then re-sent to Alertmanager with the labels and
``startsAt`` they had: no duplicate alert.

Exit codes: 0 stopped (SIGTERM/SIGINT, ``--timeout``, ``--max-events``), 1 a sink refused a request or the
dead-letter topic refused a record (nothing after it committed), 2 bad settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from consumers import kafka_io
from consumers.alerts.metrics import AlertsMetrics
from consumers.alerts.notify import alertmanager_alert, idempotency_key, webhook_body
from consumers.alerts.rules import Debouncer, Episode, InvalidEventError, Transition, parse_event
from consumers.alerts.settings import AlertsSettings, alerts_consumer_kwargs
from consumers.alerts.sinks import (
    AlertmanagerSink,
    Answer,
    SinkRefusedError,
    WebhookSink,
    dead_letter_headers,
)
from consumers.metrics import Health
from consumers.service import Stoppable, Telemetry, run_main, stop_signals
from consumers.settings import parse_service_args, producer_kwargs

log = logging.getLogger("hpad.alerts")


@dataclass
class Notification:
    """One transition of one live event, to be delivered to every sink."""

    transition: Transition
    tp: TopicPartition
    offset: int


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: AlertService) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked):
        for tp in revoked:
            self.service.forget(tp)

    def on_partitions_assigned(self, assigned):
        self.service.pending_replay.update(assigned)


class AlertService(Stoppable):
    """One ``hpad alerts`` process: events consumer, the rule's state per partition, the sinks."""

    def __init__(self, settings: AlertsSettings, consumer_factory: Callable[[], KafkaConsumer],
                 producer_factory: Callable[[], KafkaProducer], metrics: AlertsMetrics | None = None,
                 health: Health | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.rule, self.style = settings.rule(), settings.style()
        self.metrics = metrics or AlertsMetrics()
        self.health = health or Health(settings.liveness_timeout_ms / 1000)
        self.health.model_loaded = True  # no model: ready = partitions assigned
        self.debouncer = Debouncer(self.rule)
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self.worker = f"{settings.client_id}@{socket.gethostname()}:{os.getpid()}"
        self.pending_replay: set[TopicPartition] = set()
        self.replay_until: dict[TopicPartition, int] = {}  # offsets below are replayed without notifying
        self.last_sent: dict[str, float] = {}  # episode id -> monotonic time of its last Alertmanager send
        s = settings
        backoff = (s.alerts_retry_backoff_ms / 1000, s.alerts_retry_backoff_max_ms / 1000)
        timeout = s.alerts_http_timeout_ms / 1000
        self.alertmanager = None if s.alerts_alertmanager_url is None else AlertmanagerSink(
            s.alerts_alertmanager_url, timeout, kafka_io.Backoff(*backoff), self.stop_event, self._report)
        self.webhook = None if s.alerts_webhook_url is None else WebhookSink(
            s.alerts_webhook_url, s.alerts_webhook_secret.get_secret_value().encode(),  # type: ignore[union-attr]
            s.alerts_webhook_max_attempts, timeout, kafka_io.Backoff(*backoff), self.stop_event, self._report)
        self.events_done = 0
        self.exit_code = 0
        self._producer: KafkaProducer | None = None
        self._categories: set[str] = set()

    def _report(self, sink: str, seconds: float, answer: Answer) -> None:
        self.health.beat()  # a sink being retried is waiting on purpose, not stuck: /healthz stays green
        self.metrics.heartbeat.set_to_current_time()
        self.metrics.sink_duration.labels(sink=sink).observe(seconds)
        if not answer.ok:
            self.metrics.sink_errors.labels(sink=sink).inc()

    # ------------------------------------------------------------------------------ main loop
    def run(self, max_events: int | None = None, timeout: float | None = None,
            install_signals: bool | None = None) -> int:
        """Consume until stopped; the exit code (0 stopped, 1 fatal sink or dead-letter error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        consumer: KafkaConsumer | None = None
        with stop_signals(lambda signum: self.request_stop("signal"), install_signals):
            try:
                while not self.stop_event.is_set():
                    self.health.beat()
                    self.metrics.heartbeat.set_to_current_time()
                    if consumer is None:
                        consumer = self._connect()
                        continue
                    self._resend_due(consumer)
                    self._poll_once(consumer)
                    if max_events is not None and self.events_done >= max_events:
                        self.request_stop("max_events")
                    elif deadline is not None and time.monotonic() >= deadline:
                        self.request_stop("timeout")
            except SinkRefusedError as exc:
                log.error("%s; stopping, nothing after it committed", exc)
                self.exit_code = 1
            finally:
                self._close(consumer)
        log.info("stopped (%s): %d live events", self.stop_reason, self.events_done)
        return self.exit_code

    def _connect(self) -> KafkaConsumer | None:
        try:
            consumer = self._consumer_factory()
            consumer.subscribe([self.settings.events_topic], listener=_Rebalance(self))
        except KafkaError as exc:
            log.warning("cannot connect to Kafka (%s); retrying", exc)
            self.stop_event.wait(2.0)
            return None
        log.info("alerts consuming %s as group %s (%s); rule %d of %d, resolve after %d normal, cooldown %.0f s; "
                 "sinks: %s", self.settings.events_topic, self.settings.group_id,
                 alerts_consumer_kwargs(self.settings)["isolation_level"], self.rule.min_anomalous,
                 self.rule.window, self.rule.resolve_normals, self.rule.cooldown_s,
                 ", ".join(n for n, s in (("alertmanager", self.alertmanager), ("webhook", self.webhook)) if s))
        return consumer

    def _close(self, consumer: KafkaConsumer | None) -> None:
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except KafkaError as exc:
                log.debug("consumer close: %s", exc)
        if self._producer is not None:
            self._producer.close(timeout=self.settings.request_timeout_ms / 1000)

    # ------------------------------------------------------------------------------ assignment and replay
    def forget(self, tp: TopicPartition) -> None:
        for episode in self.debouncer.open_episodes(tp):
            self.last_sent.pop(episode.id, None)
        self.debouncer.drop(tp)
        self.replay_until.pop(tp, None)
        self.pending_replay.discard(tp)
        self._update_open_gauge()

    def _start_replays(self, consumer: KafkaConsumer, batch: dict) -> set[TopicPartition]:
        """Seek newly assigned partitions back to rebuild their state; returns those that moved (their records
        of the current poll are dropped: they are read again). A partition whose committed offset cannot be
        read now is put back to its first record of this poll and tried again at the next one."""
        started, seeked = set(self.pending_replay), set()
        self.pending_replay.clear()
        for tp in started:
            try:
                committed = consumer.committed(tp)
                if committed is None or committed <= 0 or self.settings.alerts_replay_records == 0:
                    continue  # a new group: nothing was delivered before, nothing to rebuild
                first = consumer.beginning_offsets([tp]).get(tp, 0) or 0
            except KafkaError as exc:
                log.warning("partition %s-%d: committed offset unknown (%s); trying again", tp.topic, tp.partition,
                            exc)
                self.pending_replay.add(tp)
                if batch.get(tp):
                    consumer.seek(tp, batch[tp][0].offset)
                seeked.add(tp)
                continue
            start = max(first, committed - self.settings.alerts_replay_records)
            consumer.seek(tp, start)
            self.replay_until[tp] = committed
            seeked.add(tp)
            log.info("partition %s-%d: rebuilding state from offset %d to %d (committed)", tp.topic, tp.partition,
                     start, committed)
        return seeked

    def _finish_replays(self, consumer: KafkaConsumer) -> None:
        for tp, until in list(self.replay_until.items()):
            try:
                position = consumer.position(tp)
            except KafkaError:
                continue
            if position is not None and position >= until:
                del self.replay_until[tp]
                episodes = self.debouncer.open_episodes(tp)
                log.info("partition %s-%d: state rebuilt, %d open episode(s) to re-send", tp.topic, tp.partition,
                         len(episodes))

    # ------------------------------------------------------------------------------ one batch
    def _poll_once(self, consumer: KafkaConsumer) -> None:
        try:
            batch = consumer.poll(timeout_ms=500, max_records=500)
        except KafkaError as exc:
            log.warning("poll failed (%s); retrying", exc)
            self.stop_event.wait(1.0)
            return
        self.health.assigned = len(consumer.assignment())
        self.metrics.assigned.set(self.health.assigned)
        skip = self._start_replays(consumer, batch) if self.pending_replay else set()
        notifications: list[Notification] = []
        invalid: list = []
        commit: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            if tp in skip:
                continue
            for record in records:
                commit[tp] = record.offset + 1
                replay = record.offset < self.replay_until.get(tp, -1)
                try:
                    event = parse_event(record.value)
                except InvalidEventError as exc:
                    if not replay:  # dead-lettered when it was first read
                        self.metrics.events.labels(result="invalid").inc()
                        invalid.append((record, exc))
                    continue
                transition = self.debouncer.feed(tp, event)
                if replay:
                    self.metrics.events.labels(result="replayed").inc()
                    continue
                self.metrics.events.labels(result="live").inc()
                self.events_done += 1
                if transition is not None:
                    notifications.append(Notification(transition, tp, record.offset))
        self._finish_replays(consumer)
        if not (notifications or invalid or commit):
            return
        if not self._deliver(notifications, invalid):
            return  # stopped or failed: nothing committed, the batch is read again after a restart
        self._commit(consumer, {tp: off for tp, off in commit.items() if off > self.replay_until.get(tp, -1)})
        self._update_open_gauge()

    def _deliver(self, notifications: list[Notification], invalid: list) -> bool:
        now = datetime.now(UTC)
        if self.alertmanager is not None and notifications:
            alerts = [alertmanager_alert(self.style, self.rule, n.transition.episode, now, self.settings.alerts_ttl_s)
                      for n in notifications]
            if not self.alertmanager.post(alerts):
                return False
            for n in notifications:
                self.metrics.notifications.labels(sink="alertmanager", status=n.transition.status).inc()
                if n.transition.status == "firing":
                    self.last_sent[n.transition.episode.id] = time.monotonic()
                else:
                    self.last_sent.pop(n.transition.episode.id, None)
        dead: list[tuple[bytes, bytes, list[tuple[str, bytes]], str]] = []
        for n in notifications:
            episode, status = n.transition.episode, n.transition.status
            if status == "firing":
                self.metrics.episodes.labels(category=episode.category).inc()
            if self.webhook is None:
                continue
            body, key = webhook_body(self.style, self.rule, episode, status), idempotency_key(episode, status)
            outcome = self.webhook.deliver(body, key)
            if outcome.ok:
                self.metrics.notifications.labels(sink="webhook", status=status).inc()
                continue
            if self.stop_event.is_set():
                return False
            reason = "webhook_failed" if outcome.last.retriable else "webhook_rejected"
            log.error("webhook notification %s goes to %s after %d attempt(s): %s", key,
                      self.settings.alerts_dlq_topic, outcome.attempts, outcome.last.reason)
            headers = dead_letter_headers(reason, outcome.last.reason, now, self.worker, {
                "idempotency-key": key, "hpad-attempts": str(outcome.attempts), "hpad-webhook-host": self.webhook.host,
                "hpad-original-topic": n.tp.topic, "hpad-original-partition": str(n.tp.partition),
                "hpad-original-offset": str(n.offset), "content-type": "application/json"})
            dead.append((key.encode(), body, headers, reason))
        for record, exc in invalid:
            log.warning("event %s-%d@%d is unreadable (%s: %s); dead-lettered", record.topic, record.partition,
                        record.offset, exc.reason, exc)
            headers = dead_letter_headers("invalid_event", f"{exc.reason}: {exc}", now, self.worker, {
                "hpad-original-topic": record.topic, "hpad-original-partition": str(record.partition),
                "hpad-original-offset": str(record.offset)})
            dead.append((record.key, record.value or b"", headers, "invalid_event"))
        if dead:
            self._dead_letter(dead)
        return True

    def _dead_letter(self, records: list[tuple[bytes, bytes, list[tuple[str, bytes]], str]]) -> None:
        if self._producer is None:
            self._producer = kafka_io.make_producer(producer_kwargs(self.settings))
        deliveries = [kafka_io.send(self._producer, self.settings.alerts_dlq_topic, key, value, headers)
                      for key, value, headers, _ in records]
        kafka_io.flush(self._producer, self.settings.request_timeout_ms / 1000)
        for delivery, (_, _, _, reason) in zip(deliveries, records, strict=True):
            ok, error = delivery.outcome(wait_s=self.settings.request_timeout_ms / 1000)
            if not ok:
                raise SinkRefusedError(f"the dead-letter topic {self.settings.alerts_dlq_topic} refused a record: "
                                  f"{error or 'timeout'}")
            self.metrics.dead_letters.labels(reason=reason).inc()

    def _commit(self, consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
            self.metrics.commits.labels(result="ok").inc()
        except (CommitFailedError, KafkaError) as exc:  # a rebalance took the partitions: the next owner redoes it
            self.metrics.commits.labels(result="failed").inc()
            log.warning("commit failed (%s); the batch is processed again by the partitions' next owner", exc)

    # ------------------------------------------------------------------------------ Alertmanager re-sends
    def _resend_due(self, consumer: KafkaConsumer) -> None:
        if self.alertmanager is None:
            return
        now_mono, due = time.monotonic(), []
        for tp in list(self.debouncer.lines):
            if tp in self.replay_until or tp in self.pending_replay:
                continue  # still rebuilding: its episodes are not final yet
            for episode in self.debouncer.open_episodes(tp):
                if now_mono - self.last_sent.get(episode.id, 0.0) >= self.settings.alerts_resend_s:
                    due.append(episode)
        if not due:
            return
        alerts = [alertmanager_alert(self.style, self.rule, e, datetime.now(UTC), self.settings.alerts_ttl_s)
                  for e in due]
        if self.alertmanager.post(alerts, retry=False):
            self.metrics.resends.inc(len(due))
            for episode in due:
                self.last_sent[episode.id] = now_mono

    def _update_open_gauge(self) -> None:
        counts: dict[str, int] = {}
        for episode in self.debouncer.open_episodes():
            counts[episode.category] = counts.get(episode.category, 0) + 1
        self._categories |= set(counts)
        for category in self._categories:
            self.metrics.open_episodes.labels(category=category).set(counts.get(category, 0))

    def open_episodes(self) -> list[Episode]:
        return self.debouncer.open_episodes()


# ------------------------------------------------------------------------------------------ command


def parse_args(argv: Sequence[str]) -> tuple[AlertsSettings, argparse.Namespace]:
    return parse_service_args("hpad alerts", __doc__.split("\n\n")[0], AlertsSettings, argv, [
        ("--max-events", int, "stop after this many live events (tests)"),
        ("--timeout", float, "stop after this many seconds")])


def start(settings: AlertsSettings, ns: argparse.Namespace, telemetry: Telemetry | None) -> int:
    service = AlertService(
        settings, lambda: kafka_io.make_consumer(alerts_consumer_kwargs(settings)),
        lambda: kafka_io.make_producer(producer_kwargs(settings)),
        telemetry.metrics if telemetry else None, telemetry.health if telemetry else None)
    return service.run(max_events=ns.max_events, timeout=ns.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(args, parse_args, start, packages=("hpad", "consumers"),
                    metrics=lambda settings: AlertsMetrics() if settings.metrics_port >= 0 else None,
                    fatal=(KafkaError,), describe=lambda exc: f"Kafka error: {exc}", logger=log)


if __name__ == "__main__":  # pragma: no cover
    threading.current_thread().name = "hpad-alerts"
    sys.exit(main())

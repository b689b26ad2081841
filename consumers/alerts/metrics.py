"""Prometheus metrics of ``hpad alerts`` (own registry; served by `consumers.metrics.MetricsServer`).

Naming follows the scorers': ``hpad_alerts_`` prefix, ``_total`` counters, ``_seconds`` durations; no camera or
frame ids in labels (open episodes are counted per category).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.metrics import STAGE_BUCKETS, MetricSet

SINKS = ("alertmanager", "webhook")
STATUSES = ("firing", "resolved")
EVENT_RESULTS = ("live", "replayed", "invalid")
DEAD_LETTER_REASONS = ("webhook_failed", "webhook_rejected", "invalid_event")


class AlertsMetrics(MetricSet):
    """Every metric of one ``hpad alerts`` process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter("hpad_alerts_events", "Events read, by result (live = fed to the rule, replayed = "
                              "re-read after an assignment to rebuild state, no notifications; invalid = "
                              "unreadable, dead-lettered)", ["result"], registry=r)
        self.notifications = Counter("hpad_alerts_notifications", "Notifications a sink acknowledged, by sink "
                                     "and status (Alertmanager re-sends of firing alerts not included)",
                                     ["sink", "status"], registry=r)
        self.resends = Counter("hpad_alerts_alertmanager_resends", "Firing alerts re-sent to Alertmanager "
                               "(keeps them from expiring; also after a restart)", registry=r)
        self.sink_errors = Counter("hpad_alerts_sink_errors", "Failed sink requests (each is retried with "
                                   "backoff), by sink", ["sink"], registry=r)
        self.sink_duration = Histogram("hpad_alerts_sink_duration_seconds", "Duration of one sink request",
                                       ["sink"], buckets=STAGE_BUCKETS, registry=r)
        self.dead_letters = Counter("hpad_alerts_dead_letters", "Records written to the alerts dead-letter "
                                    "topic, by reason", ["reason"], registry=r)
        self.episodes = Counter("hpad_alerts_episodes", "Episodes opened (live events only), by category",
                                ["category"], registry=r)
        self.open_episodes = Gauge("hpad_alerts_open_episodes", "Episodes firing now on this process's "
                                   "partitions, by category", ["category"], registry=r)
        self.commits = Counter("hpad_alerts_commits", "Offset commits, by result (ok, failed)", ["result"], registry=r)
        self.assigned = Gauge("hpad_alerts_assigned_partitions", "Events partitions assigned to this process",
                              registry=r)
        self.heartbeat = Gauge("hpad_alerts_main_loop_heartbeat_timestamp_seconds", "Unix time of the main "
                               "loop's last iteration", registry=r)
        for result in EVENT_RESULTS:
            self.events.labels(result=result)
        for sink in SINKS:
            self.sink_errors.labels(sink=sink)
            for status in STATUSES:
                self.notifications.labels(sink=sink, status=status)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for result in ("ok", "failed"):
            self.commits.labels(result=result)

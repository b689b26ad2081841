"""Prometheus metrics of ``hpad console`` (own registry; served by `consumers.metrics.MetricsServer`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from consumers.console.feedback import VERDICTS
from consumers.console.store import DROP_REASONS
from consumers.metrics import MetricSet

FEEDBACK_REFUSALS = ("read_only", "bad_token", "unknown_frame", "unscored", "bad_request", "kafka_error")


class ConsoleMetrics(MetricSet):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.records = Counter("hpad_console_records", "Records read, by topic kind (frames, events)", ["kind"],
                               registry=r)
        self.dropped = Counter("hpad_console_dropped", "Frames and events dropped or evicted before they were "
                               "shown joined, by reason", ["reason"], registry=r)
        self.frames = Gauge("hpad_console_frames_in_memory", "Frames held in memory (rings + anomaly lists)",
                            registry=r)
        self.bytes = Gauge("hpad_console_frame_bytes", "Bytes of the frames held in memory", registry=r)
        self.cameras = Gauge("hpad_console_cameras", "Cameras shown", registry=r)
        self.clients = Gauge("hpad_console_live_clients", "Pages following the live stream (server-sent events)",
                             registry=r)
        self.feedback = Counter("hpad_console_feedback", "Feedback records published, by verdict", ["verdict"],
                                registry=r)
        self.refused = Counter("hpad_console_feedback_refused", "Feedback requests refused, by reason", ["reason"],
                               registry=r)
        self.heartbeat = Gauge("hpad_console_reader_heartbeat_timestamp_seconds", "Unix time of the Kafka reader "
                               "loop's last iteration", registry=r)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for verdict in VERDICTS:
            self.feedback.labels(verdict=verdict)
        for reason in FEEDBACK_REFUSALS:
            self.refused.labels(reason=reason)
        for kind in ("frames", "events"):
            self.records.labels(kind=kind)

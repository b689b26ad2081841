"""Prometheus metrics of the tuner daemon (``hpad tune``), on its own registry.

Served by the same `consumers.metrics.MetricsServer` as the scorers' (``/metrics``, ``/healthz`` from the
main loop's heartbeat, ``/readyz`` once the reservoir is loaded and the normals topic is assigned).
Naming follows the scorers': ``hpad_tuner_`` prefix, ``_total`` counters, ``_seconds`` durations, no frame
ids in labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.metrics import MetricSet
from consumers.metrics import metric_names as _metric_names
from consumers.metrics import sample_names as _sample_names

RUN_OUTCOMES = ("published", "rejected", "failed", "skipped")
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
SAMPLE_DROP_REASONS = ("undecodable", "unknown_category", "bad_header", "too_large", "write_error", "bad_feedback")
FEEDBACK_VERDICTS = ("false_alarm", "real_defect")


class TunerMetrics(MetricSet):
    """Every metric of one tuner process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.runs = Counter("hpad_tuner_runs", "Tuning runs by outcome (published, rejected by the validation "
                            "gate, failed with an error, skipped for too few normals)", ["category", "outcome"],
                            registry=r)
        self.run_duration = Histogram("hpad_tuner_run_duration_seconds", "Duration of one tuning run "
                                      "(OAGM + MPTS + validation gate)", ["category"], buckets=RUN_BUCKETS, registry=r)
        self.reservoir = Gauge("hpad_tuner_reservoir_samples", "Normal frames in the reservoir, by pool "
                               "(recent = sampled by scorers, verified = published by operators)",
                               ["category", "pool"], registry=r)
        self.samples = Counter("hpad_tuner_samples_received", "Normal frames stored in the reservoir",
                               ["category", "pool"], registry=r)
        self.dropped = Counter("hpad_tuner_samples_dropped", "Records of the normals topic not stored, by reason",
                               ["reason"], registry=r)
        self.write_errors = Counter("hpad_tuner_reservoir_write_errors", "Reservoir writes that failed "
                                    "(disk full, read-only volume)", registry=r)
        self.validation = Gauge("hpad_tuner_validation_score", "Validation-gate metrics of the last run: "
                                "which = current or candidate; metric = gate, image_AUROC, pixel_AUROC",
                                ["category", "which", "metric"], registry=r)
        self.last_publish = Gauge("hpad_tuner_last_publish_timestamp_seconds", "Unix time of the last published "
                                  "version per category", ["category"], registry=r)
        self.last_run = Gauge("hpad_tuner_last_run_timestamp_seconds", "Unix time the last run of a category "
                              "ended (any outcome)", ["category"], registry=r)
        self.version = Gauge("hpad_tuner_published_version", "Newest valid version on the prompts topic per "
                             "category", ["category"], registry=r)
        self.heartbeat = Gauge("hpad_tuner_main_loop_heartbeat_timestamp_seconds", "Unix time of the tuner main "
                               "loop's last iteration", registry=r)
        self.feedback = Counter("hpad_tuner_feedback_received", "Operator feedback frames stored (hpad console), "
                                "by verdict", ["category", "verdict"], registry=r)
        self.feedback_used = Gauge("hpad_tuner_feedback_used", "Feedback frames the last run used, by verdict "
                                   "(false alarms as normals, real defects in the gate)", ["category", "verdict"],
                                   registry=r)
        self.feedback_held = Gauge("hpad_tuner_feedback_held_back", "Feedback frames the last run left out by "
                                   "the per-operator cap, by verdict", ["category", "verdict"], registry=r)
        for reason in SAMPLE_DROP_REASONS:
            self.dropped.labels(reason=reason)


def metric_names() -> list[str]:
    """Every tuner metric family as exposed (counters with ``_total``), sorted."""
    return _metric_names(TunerMetrics())


def sample_names() -> list[str]:
    return _sample_names(TunerMetrics())

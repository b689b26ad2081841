"""Prometheus metrics of the scoring worker (own registry) and its HTTP endpoints.

``/metrics``: the registry in the Prometheus text format. ``/healthz``: liveness, 200 while the main loop's
heartbeat is younger than HPAD_LIVENESS_TIMEOUT_MS (the loop keeps polling while the model works, so a slow
batch does not fail it). ``/readyz``: 200 when the model is loaded and partitions are assigned.

Naming: ``hpad_`` prefix, counters end in ``_total``, durations are ``_seconds`` histograms, no frame or
camera ids in labels. `metric_names` lists every family so dashboards and alert rules can be checked.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from consumers.contract import REASONS

log = logging.getLogger(__name__)

STAGES = ("decode", "queue", "infer", "encode", "produce", "commit")
OUTCOMES = ("scored", "dead_lettered", "abandoned")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROMPT_REJECT_REASONS = ("invalid", "wrong_model", "wrong_laa", "not_newer", "unknown_category")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class MetricSet:
    """One process's metrics: prometheus_client metrics as attributes, registered in ``self.registry``."""

    registry: CollectorRegistry

    def families(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(exposed name, type, label names, help) of every metric, sorted by name."""
        return families(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics(MetricSet):
    """Every metric of one worker, on its own registry (several workers can live in one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.frames = Counter("hpad_frames", "Frames handled, by outcome (scored, dead_lettered, abandoned "
                              "= dropped because the partition moved to another worker)", ["outcome"], registry=r)
        self.dead_letters = Counter("hpad_dead_letters", "Frames sent to the dead-letter topic, by reason",
                                    ["reason"], registry=r)
        self.anomalies = Counter("hpad_anomalies", "Frames scored as anomalous, by category", ["category"], registry=r)
        self.retries = Counter("hpad_retries", "Transient failures retried (produce, commit, poll, oom_split, "
                               "oom_retry, transaction)", ["kind"], registry=r)
        self.commits = Counter("hpad_commits", "Offset commits, by result (ok, failed)", ["result"], registry=r)
        self.batch_size = Histogram("hpad_batch_size", "Model images per scored batch (frames scored whole, plus the tiles of tiled frames)", buckets=BATCH_BUCKETS, registry=r)
        self.stage = Histogram("hpad_stage_duration_seconds", "Duration of a pipeline stage: decode and queue "
                               "per frame; infer, encode, produce and commit per batch", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.latency = Histogram("hpad_end_to_end_latency_seconds", "captured_at (camera) -> event "
                                 "acknowledged by the broker", buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("hpad_consumer_lag", "Records not yet committed by the group (high watermark - "
                         "committed offset), per assigned partition", ["topic", "partition"], registry=r)
        self.prompt = Gauge("hpad_prompt_version_info", "Prompt set in use per category (value 1; version and "
                            "source in labels)", ["category", "version", "source"], registry=r)
        self.model = Gauge("hpad_model_info", "Model in use (value 1); random_weights=true means scores carry "
                           "no meaning", ["model", "weights", "random_weights", "device", "precision"], registry=r)
        self.assigned = Gauge("hpad_assigned_partitions", "Partitions assigned to this worker", registry=r)
        self.inflight = Gauge("hpad_inflight_frames", "Frames polled but not yet acknowledged", registry=r)
        self.ready = Gauge("hpad_ready", "1 when the model is loaded and partitions are assigned", registry=r)
        self.heartbeat = Gauge("hpad_main_loop_heartbeat_timestamp_seconds", "Unix time of the main loop's last "
                               "iteration", registry=r)
        self.prompt_swaps = Counter("hpad_prompt_swaps", "Prompt versions swapped in between batches, by category",
                                    ["category"], registry=r)
        self.prompt_rejected = Counter("hpad_prompt_rejected", "Prompt versions from the prompts topic refused "
                                       "(invalid = corrupt/tampered/unreadable, wrong_model, wrong_laa, "
                                       "not_newer, unknown_category); the current version keeps scoring",
                                       ["reason"], registry=r)
        self.prompt_swap_time = Gauge("hpad_prompt_last_swap_timestamp_seconds", "Unix time the category's "
                                      "current prompt version was swapped in (start time for the first)",
                                      ["category"], registry=r)
        self.normals_published = Counter("hpad_normals_published", "Confidently normal frames sampled to the "
                                         "normals topic for the tuner, by category", ["category"], registry=r)
        for stage in STAGES:
            self.stage.labels(stage=stage)
        for outcome in OUTCOMES:
            self.frames.labels(outcome=outcome)
        for reason in REASONS:
            self.dead_letters.labels(reason=reason)
        for reason in PROMPT_REJECT_REASONS:
            self.prompt_rejected.labels(reason=reason)
        self._prompt_labels: dict[str, tuple[str, str]] = {}
        self._lag_labels: set[tuple[str, str]] = set()

    def set_prompt(self, category: str, version: int, source: str) -> None:
        old = self._prompt_labels.get(category)
        if old is not None and old != (str(version), source):
            self.prompt.remove(category, *old)
        self._prompt_labels[category] = (str(version), source)
        self.prompt.labels(category=category, version=str(version), source=source).set(1)

    def set_model(self, model: str, weights: str, random_weights: bool, device: str, precision: str) -> None:
        self.model.labels(model=model, weights=weights, random_weights=str(random_weights).lower(),
                          device=device, precision=precision).set(1)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Replace the lag series with the currently assigned partitions' values."""
        current = {(topic, str(partition)) for topic, partition in lags}
        for labels in self._lag_labels - current:
            self.lag.remove(*labels)
        for (topic, partition), value in lags.items():
            self.lag.labels(topic=topic, partition=str(partition)).set(value)
        self._lag_labels = current


def families(holder: object) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(exposed name, type, label names, help) of every metric attribute of ``holder``, sorted by name."""
    rows = []
    for metric in vars(holder).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            name = family.name + "_total" if family.type == "counter" else family.name
            rows.append((name, family.type, tuple(getattr(metric, "_labelnames", ())), family.documentation))
    return sorted(rows)


def metric_names(holder: object | None = None) -> list[str]:
    """Every metric family name as exposed (counters with ``_total``), sorted; for dashboards and alerts.
    Default: the scoring worker's metrics (the tuner's: `tuner.metrics.metric_names`)."""
    return [name for name, _, _, _ in families(holder if holder is not None else WorkerMetrics())]


def sample_names(holder: object | None = None) -> list[str]:
    """Every series name PromQL can use (``_bucket``/``_sum``/``_count`` of histograms, ``_total``...)."""
    names = []
    for name, kind, _, _ in families(holder if holder is not None else WorkerMetrics()):
        names += [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name]
    return sorted(names)


class Health:
    """Liveness (main-loop heartbeat age) and readiness (model loaded, partitions assigned)."""

    def __init__(self, liveness_timeout_s: float) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self._beat = time.monotonic()
        self.model_loaded = False
        self.assigned = 0

    def beat(self) -> None:
        self._beat = time.monotonic()

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._beat

    def live(self) -> bool:
        return self.heartbeat_age() < self.liveness_timeout_s

    def ready(self) -> bool:
        return self.model_loaded and self.assigned > 0

    def liveness_text(self) -> str:
        """The body of ``/healthz`` (other processes' Health subclasses say more)."""
        return f"{'ok' if self.live() else 'stuck'}: main loop heartbeat {self.heartbeat_age():.1f} s ago\n"

    def readiness_text(self) -> str:
        return f"model_loaded={self.model_loaded} assigned_partitions={self.assigned}\n"


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, metrics: object, health: Health, host: str, port: int) -> None:
        handler = _handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hpad-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(metrics: object, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200 if health.live() else 503, health.liveness_text())
            elif path == "/readyz":
                self._reply(200 if health.ready() else 503, health.readiness_text())
            else:
                self._reply(404, "try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics http: " + format, *args)

    return Handler


def start_metrics_server(metrics: object, health: Health, host: str, port: int) -> MetricsServer | None:
    """The HTTP endpoints of a service process, or None when ``port`` is -1 (off)."""
    if port < 0:
        return None
    server = MetricsServer(metrics, health, host, port).start()
    log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", host, server.port)
    return server

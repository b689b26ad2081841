"""``hpad tune``: the tuning daemon. Fresh normals in, validated prompt versions out.

Main loop (one thread): poll the normals topic (consumer group ``HPAD_GROUP_ID``), check and decode each
frame with the scorer's own frame contract, store it in the persistent `Reservoir`, commit; update the
metrics and the heartbeat; start a tuning run for a due category. Runs execute on one worker thread, one at
a time, so the loop keeps consuming (and ``/healthz`` stays green) during a run of many minutes.

A run (`run_category`): newest normals (verified first) -> `tuner.job.tune_category` (OAGM + MPTS,
warm-started from the newest valid version on the prompts topic, or from zero-shot prompts when there is
none) -> validation gate -> publish one record through `PromptRegistry` only if the gate passes. The
record is the whole immutable artifact, acknowledged by the broker before the run counts as published, so a
crash at any point publishes either nothing or one complete, checksummed version.

Schedule state (per category: last run end, samples since, last outcome) is written atomically to
``<HPAD_RESERVOIR_DIR>/tuner-state.json`` only when a run ends. A tuner killed mid-run therefore finds the
category still due on restart and runs it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from consumers import kafka_io
from consumers.contract import Limits, check_payload_size, parse_frame_headers
from consumers.decode import decode_frame, inspect_frame
from consumers.metrics import Health
from consumers.models import build_scorer
from consumers.service import Stoppable, Telemetry, run_main, stop_signals
from consumers.settings import (
    connection_kwargs,
    parse_service_args,
    producer_kwargs,
    prompts_consumer_kwargs,
)
from hpad.artifact import PromptArtifact, read_artifact
from hpad.errors import ConfigError, FrameError, HpadError
from hpad.io import atomic_write_text
from hpad.mpts import Pool
from hpad.scorer import Scorer
from hpad.tiling import TileSpec, plan_tiles
from tuner.feedback import FeedbackStore, admit_defects, admit_false_alarms, parse_feedback
from tuner.job import TuneOutcome, candidate_artifact, encode_labelled, tune_category
from tuner.metrics import TunerMetrics
from tuner.registry import PromptRegistry, RegistryError
from tuner.reservoir import Reservoir, ReservoirWriteError
from tuner.settings import TunerSettings

log = logging.getLogger("hpad.tune")
STATE_FILE = "tuner-state.json"


# ------------------------------------------------------------------------------------------ schedule (pure)


@dataclass
class CategoryState:
    """What the scheduler remembers about one category (persisted)."""

    last_run_end: float = 0.0  # unix time the last run ended (0 = never)
    since: int = 0  # normals stored since the last run started
    runs: int = 0
    last_outcome: str = ""
    last_failure: float = 0.0


def due_reason(state: CategoryState, now: float, normals: int, *, interval_s: float, new_samples: int,
               min_gap_s: float, retry_s: float, min_normals: int) -> str | None:
    """Why a category should be tuned now (``interval``, ``new_samples``, ``first``), or None."""
    if normals < min_normals:
        return None
    if state.last_failure and now - state.last_failure < retry_s:
        return None
    if state.last_run_end and now - state.last_run_end < min_gap_s:
        return None
    if new_samples > 0 and state.since >= new_samples:
        return "new_samples"
    if state.last_run_end == 0:
        return "first"
    if interval_s > 0 and now - state.last_run_end >= interval_s:
        return "interval"
    return None


def load_state(path: Path) -> dict[str, CategoryState]:
    """The persisted schedule; a missing or unreadable file means a fresh schedule (logged)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {category: CategoryState(**values) for category, values in raw.items()}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("tuner state %s is unreadable (%s); starting a fresh schedule", path, exc)
        return {}


def save_state(path: Path, states: dict[str, CategoryState]) -> None:
    """Atomic write (temporary file, fsync, rename)."""
    atomic_write_text(path, json.dumps({c: asdict(s) for c, s in states.items()}, indent=1, sort_keys=True))


def is_verified(headers: Sequence[tuple[str, bytes | None]] | None) -> bool:
    """Header ``verified=true`` (case-insensitive name and value): an operator vouches the frame is normal."""
    return any(name.lower() == "verified" and (raw or b"").strip().lower() == b"true" for name, raw in headers or ())


def drop_reason(error: FrameError) -> str:
    """A frame-contract reason -> the tuner's coarser ``hpad_tuner_samples_dropped_total`` reason."""
    if error.reason == "unknown_category":
        return "unknown_category"
    if error.reason in ("payload_too_large", "too_many_pixels", "bad_dimensions"):
        return "too_large"
    if error.reason in ("missing_header", "invalid_header", "unsupported_content_type", "roi_outside_frame"):
        return "bad_header"
    return "undecodable"


def load_labelled(root: Path | None, category: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Operator-labelled anomalies: ``<root>/<category>/<name>.png`` with ``<name>_mask.png`` (non-zero = defect)."""
    if root is None or not (root / category).is_dir():
        return [], []
    images, masks = [], []
    for path in sorted((root / category).glob("*.png")):
        if path.stem.endswith("_mask"):
            continue
        mask_path = path.with_name(f"{path.stem}_mask.png")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.is_file() else None
        if image is None or mask is None or mask.shape != image.shape[:2]:
            log.warning("labelled anomaly %s skipped (unreadable, or no matching %s)", path, mask_path.name)
            continue
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        masks.append((mask > 0).astype(np.uint8))
    return images, masks


# ------------------------------------------------------------------------------------------ the daemon


@dataclass
class RunReport:
    category: str
    outcome: str  # published, rejected, failed, skipped
    reason: str
    seconds: float
    version: int | None = None
    current: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    normals: int = 0  # normals the run used (verified + admitted false alarms + scorer samples)
    feedback: dict[str, object] = field(default_factory=dict)  # what operator feedback contributed


class Tuner(Stoppable):
    """One tuner process: normals consumer, reservoir, schedule, one run at a time, registry publishes."""

    def __init__(self, settings: TunerSettings, scorer: Scorer, registry: PromptRegistry, reservoir: Reservoir,
                 consumer_factory: Callable[[], KafkaConsumer], metrics: TunerMetrics | None = None,
                 health: Health | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.scorer = scorer
        self.registry = registry
        self.reservoir = reservoir
        self._consumer_factory = consumer_factory
        self._metadata_watch: kafka_io.MetadataWatch | None = None
        self.metrics = metrics or TunerMetrics()
        self.health = health or Health(settings.liveness_timeout_ms / 1000)
        self.health.model_loaded = True
        self.limits = Limits(settings.max_payload_bytes, settings.max_pixels)
        self.feedback = FeedbackStore(Path(settings.reservoir_dir), settings.feedback_kept)
        self.state_path = Path(settings.reservoir_dir) / STATE_FILE
        self.states = load_state(self.state_path)
        self.publishing = threading.Event()
        self.reports: list[RunReport] = []
        self._running: tuple[str, Future] | None = None  # one run at a time, on a daemon thread
        for category in settings.categories:
            self.states.setdefault(category, CategoryState())
        self._update_reservoir_metrics()

    # ------------------------------------------------------------------------------ main loop
    def run(self, max_runs: int | None = None, timeout: float | None = None,
            install_signals: bool | None = None) -> int:
        """Consume and tune until stopped; returns the number of runs that ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        consumer: KafkaConsumer | None = None
        with stop_signals(self._on_signal, install_signals):
            try:
                while not self.stop_event.is_set():
                    self.health.beat()
                    self.metrics.heartbeat.set_to_current_time()
                    if consumer is None:
                        consumer = self._connect()
                        if consumer is None:
                            continue
                    self._consume(consumer)
                    self._reap()
                    if max_runs is not None and len(self.reports) >= max_runs and self._running is None:
                        self.request_stop("max_runs")
                    elif deadline is not None and time.monotonic() >= deadline:
                        self.request_stop("timeout")
                    else:
                        self._maybe_start_run()
                return len(self.reports)
            finally:
                self._finish(consumer)

    def _on_signal(self, signum: int) -> None:
        log.info("received %s: stopping (a run in progress is abandoned unless it is publishing)",
                 signal.Signals(signum).name)
        self.request_stop("signal")

    def _connect(self) -> KafkaConsumer | None:
        try:
            consumer = self._consumer_factory()
            topics = [self.settings.normals_topic] + ([self.settings.feedback_topic] if self.settings.feedback_topic
                                                       else [])
            consumer.subscribe(topics)
            self._metadata_watch = kafka_io.MetadataWatch(consumer, topics)
            log.info("tuner consuming %s as group %s; categories %s; reservoir %s", ", ".join(topics),
                     self.settings.group_id, ",".join(self.settings.categories), self.settings.reservoir_dir)
            return consumer
        except KafkaError as exc:
            log.warning("cannot connect to Kafka (%s); retrying", exc)
            self.stop_event.wait(2.0)
            return None

    def _finish(self, consumer: KafkaConsumer | None) -> None:
        if self._running is not None and self.publishing.is_set():
            log.info("waiting for the publish in progress to be acknowledged")
            try:
                self._running[1].result(timeout=self.settings.request_timeout_ms / 1000 + 5)
            except Exception as exc:  # noqa: BLE001 - reported, we are stopping anyway
                log.warning("publish in progress failed while stopping: %s", exc)
        elif self._running is not None:  # a daemon thread: it dies with the process and never publishes
            log.info("stopping: run of %s abandoned; it runs again after restart", self._running[0])
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except KafkaError as exc:
                log.debug("consumer close: %s", exc)

    # ------------------------------------------------------------------------------ normals
    def _consume(self, consumer: KafkaConsumer) -> None:
        try:
            batch = consumer.poll(timeout_ms=500, max_records=64)
        except kafka_io.FATAL_GROUP_ERRORS as exc:  # a setting or the ACLs must change: exit 2, not retry
            raise ConfigError(kafka_io.group_error_message(exc, self.settings.group_id,
                                                           self.settings.session_timeout_ms)) from exc
        except KafkaError as exc:
            log.warning("poll failed (%s); retrying", exc)
            self.stop_event.wait(1.0)
            return
        self.health.assigned = len(consumer.assignment())
        if self._metadata_watch is not None:  # assigned nothing for want of metadata: refresh it
            self._metadata_watch.check()
        if not batch:
            return
        for records in batch.values():
            for record in records:
                self.ingest(record)
        try:
            consumer.commit()
        except KafkaError as exc:  # the samples are stored; at worst they are stored twice after a restart
            log.warning("normals commit failed: %s", exc)
        self._update_reservoir_metrics()

    def ingest(self, record) -> str:
        """Check, decode and store one normals record; returns ``stored`` or the drop reason."""
        if self.settings.feedback_topic and record.topic == self.settings.feedback_topic:
            return self.ingest_feedback(record)
        try:
            value = check_payload_size(record.value, self.limits)
            meta = parse_frame_headers(record.headers, record.key)
            if meta.category not in self.settings.categories:
                raise FrameError("unknown_category", f"category {meta.category!r} is not tuned here")
            pixels = decode_frame(meta, value, inspect_frame(meta, value, self.limits))
            if meta.roi is not None:  # the scorers score only the ROI: so does training
                roi = plan_tiles(pixels.shape[:2], (1, 1), TileSpec("off"), meta.roi).roi
                pixels = np.ascontiguousarray(pixels[roi.y : roi.y + roi.h, roi.x : roi.x + roi.w])
        except FrameError as exc:
            reason = drop_reason(exc)
            self.metrics.dropped.labels(reason=reason).inc()
            log.debug("normals record %s@%d dropped: %s", record.topic, record.offset, exc)
            return reason
        verified = is_verified(record.headers)
        try:
            self.reservoir.add(meta.category, meta.frame_id, pixels, verified=verified)
        except ReservoirWriteError as exc:
            self.metrics.write_errors.inc()
            self.metrics.dropped.labels(reason="write_error").inc()
            log.error("reservoir write failed (%s); the sample is skipped, tuning continues on stored samples", exc)
            return "write_error"
        self.states[meta.category].since += 1
        self.metrics.samples.labels(category=meta.category, pool="verified" if verified else "recent").inc()
        return "stored"

    def ingest_feedback(self, record) -> str:
        """One operator verdict (`tuner.feedback`): the frame is checked with the frame contract and stored."""
        try:
            fields, meta, value = parse_feedback(record.value)
            value = check_payload_size(value, self.limits)
            if meta.category not in self.settings.categories:
                raise FrameError("unknown_category", f"category {meta.category!r} is not tuned here")
            pixels = decode_frame(meta, value, inspect_frame(meta, value, self.limits))
        except FrameError as exc:
            reason = "bad_feedback" if exc.reason == "bad_feedback" else drop_reason(exc)
            self.metrics.dropped.labels(reason=reason).inc()
            log.warning("feedback record %s@%d dropped: %s", record.topic, record.offset, exc)
            return reason
        try:
            self.feedback.add(fields, pixels)
        except (ReservoirWriteError, HpadError) as exc:
            self.metrics.write_errors.inc()
            self.metrics.dropped.labels(reason="write_error").inc()
            log.error("feedback write failed (%s); the verdict is skipped", exc)
            return "write_error"
        if fields["verdict"] == "false_alarm":
            self.states[meta.category].since += 1  # counts towards the next run like any new normal
        self.metrics.feedback.labels(category=meta.category, verdict=fields["verdict"]).inc()
        log.info("feedback %s on %s (camera %s) by %s stored", fields["verdict"], meta.frame_id, meta.camera_id,
                 fields["operator"])
        return "stored"

    def feedback_for_run(self, category: str, others: int) -> tuple[list, list, dict[str, int]]:
        """(admitted false alarms, admitted defects, held back per verdict) under the per-operator caps."""
        s = self.settings
        alarms = self.feedback.samples(category, "false_alarm")[::-1]
        defects = self.feedback.samples(category, "real_defect")[::-1]
        admitted = admit_false_alarms(alarms, others, s.feedback_max_share)
        confirmed = admit_defects(defects, s.feedback_max_defects)
        return admitted, confirmed, {"false_alarm": len(alarms) - len(admitted),
                                     "real_defect": len(defects) - len(confirmed)}

    def _update_reservoir_metrics(self) -> None:
        for category in self.settings.categories:
            for pool in ("recent", "verified"):
                self.metrics.reservoir.labels(category=category, pool=pool).set(self.reservoir.size(category, pool))

    # ------------------------------------------------------------------------------ runs
    def _maybe_start_run(self) -> None:
        if self._running is not None:
            return
        s, now = self.settings, time.time()
        for category in s.categories:
            normals = len(self.reservoir.samples(category))
            normals += len(self.feedback_for_run(category, normals)[0])
            reason = due_reason(self.states[category], now, normals, interval_s=s.interval_s,
                                new_samples=s.new_samples, min_gap_s=s.min_gap_s, retry_s=s.retry_s,
                                min_normals=s.min_normals)
            if reason is not None:
                log.info("tuning run for %s starts (%s; %d normals)", category, reason, normals)
                self._running = (category, self._start_run(category))
                return

    def run_in_progress(self) -> bool:
        return self._running is not None and not self._running[1].done()

    def _start_run(self, category: str) -> Future:
        """`run_category` on a daemon thread (an executor's threads would keep a stopping process alive)."""
        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(self.run_category(category))
            except Exception as exc:  # noqa: BLE001 - handed to _reap, which reports it
                future.set_exception(exc)

        threading.Thread(target=work, name=f"hpad-tune-{category}", daemon=True).start()
        return future

    def _reap(self) -> None:
        if self._running is None or not self._running[1].done():
            return
        category, future = self._running
        self._running = None
        try:
            report = future.result()
        except Exception as exc:
            log.exception("tuning run for %s failed", category)
            report = RunReport(category, "failed", f"{type(exc).__name__}: {exc}", 0.0)
        self._record(report)

    def _record(self, report: RunReport) -> None:
        state = self.states[report.category]
        now = time.time()
        state.runs += 1
        state.last_outcome = report.outcome
        if report.outcome == "failed":
            state.last_failure = now
        else:
            state.last_failure = 0.0
            state.last_run_end = now
            state.since = 0
        try:
            save_state(self.state_path, self.states)
        except OSError as exc:
            self.metrics.write_errors.inc()
            log.error("tuner state not saved (%s): after a restart this run may be repeated", exc)
        m = self.metrics
        m.runs.labels(category=report.category, outcome=report.outcome).inc()
        m.run_duration.labels(category=report.category).observe(report.seconds)
        m.last_run.labels(category=report.category).set(now)
        for which, values in (("current", report.current), ("candidate", report.candidate)):
            for metric, value in values.items():
                if math.isfinite(value):
                    m.validation.labels(category=report.category, which=which, metric=metric).set(value)
        if report.outcome == "published" and report.version is not None:
            m.last_publish.labels(category=report.category).set(now)
            m.version.labels(category=report.category).set(report.version)
        self.reports.append(report)
        log.info("tuning run for %s: %s (%s) in %.1f s; %d normals; feedback %s", report.category, report.outcome,
                 report.reason, report.seconds, report.normals, report.feedback)

    def current_version(self, category: str) -> PromptArtifact | None:
        rows = self.registry.history(category)
        for row in rows:
            if row.artifact is None:
                log.warning("prompts topic holds an invalid record for %s (version %d): %s", category, row.version,
                            row.error)
        latest = PromptRegistry.latest_valid(rows, category)
        return None if latest is None else latest.artifact

    def run_category(self, category: str) -> RunReport:
        """One run: normals -> candidate -> gate -> publish (or not). Runs on the run thread."""
        start = time.monotonic()
        s = self.settings
        verified = self.reservoir.samples(category, "verified")[::-1]
        recent = self.reservoir.samples(category, "recent")[::-1]
        alarms, confirmed, held = self.feedback_for_run(category, len(verified) + len(recent))
        # false alarms join the verified pool: after the verified frames, before the scorers' samples
        normals = self.reservoir.load(verified) + self.feedback.load(alarms) + self.reservoir.load(recent)
        defects = self.feedback.load(confirmed)
        feedback = {"false_alarms": [r.frame_id for r in alarms], "real_defects": [r.frame_id for r in confirmed],
                    "held_back": held}
        for verdict, used in (("false_alarm", len(alarms)), ("real_defect", len(confirmed))):
            self.metrics.feedback_used.labels(category=category, verdict=verdict).set(used)
            self.metrics.feedback_held.labels(category=category, verdict=verdict).set(held[verdict])
        config = s.tune_config()
        if len(normals) < config.min_normals:
            return RunReport(category, "skipped", f"{len(normals)} readable normals < {config.min_normals}",
                             time.monotonic() - start, normals=len(normals), feedback=feedback)
        current_artifact = self.current_version(category)
        if current_artifact is not None:
            current = self.scorer.check_prompts(current_artifact.prompts)
        else:
            current = self.scorer.zero_shot_prompts(category)
        labelled = self._labelled(category)
        seed = s.train_seed + self.states[category].runs
        outcome = tune_category(self.scorer, category, normals, current, config, current_artifact, labelled, seed,
                                defects=defects)
        feedback.update(outcome.feedback)
        d = outcome.decision
        if not d.publish:
            return RunReport(category, "rejected", d.reason, time.monotonic() - start, None, d.current.to_json(),
                             d.candidate.to_json(), len(normals), feedback)
        artifact = self._artifact(outcome, current, seed)
        if self.stop_event.is_set():  # stopping: publish nothing that nobody will record
            return RunReport(category, "failed", "stopped before publishing", time.monotonic() - start)
        self.publishing.set()
        try:
            published = self.registry.publish(artifact, parent_version=current.version)
        finally:
            self.publishing.clear()
        return RunReport(category, "published", d.reason, time.monotonic() - start, published.version,
                         d.current.to_json(), d.candidate.to_json(), len(normals), feedback)

    def _labelled(self, category: str) -> Pool | None:
        images, masks = load_labelled(self.settings.labelled_dir, category)
        return encode_labelled(self.scorer, images, masks) if images else None

    def _artifact(self, outcome: TuneOutcome, current, seed: int) -> PromptArtifact:
        return read_artifact(candidate_artifact(outcome, k=self.settings.shots,
                                                image_size=self.scorer.backbone.image_size,
                                                warm_start_from=current.version))


# ------------------------------------------------------------------------------------------ process


def normals_consumer_kwargs(s: TunerSettings) -> dict:
    return {
        **connection_kwargs(s), "group_id": s.group_id, "enable_auto_commit": False, "auto_offset_reset": "earliest",
        "session_timeout_ms": s.session_timeout_ms, "heartbeat_interval_ms": s.heartbeat_interval_ms,
        "max_partition_fetch_bytes": s.max_payload_bytes + 1024 * 1024,
        "fetch_max_bytes": max(52428800, s.max_payload_bytes + 1024 * 1024),
        "max_poll_interval_ms": 300000,
    }


def build_tuner(settings: TunerSettings, metrics: TunerMetrics | None = None, health: Health | None = None) -> Tuner:
    reservoir = Reservoir(settings.reservoir_dir, settings.reservoir_recent, settings.reservoir_verified)
    scorer = build_scorer(settings, max_batch=8)
    registry = PromptRegistry(
        settings.prompts_topic, lambda: kafka_io.make_consumer(prompts_consumer_kwargs(settings)),
        lambda: kafka_io.make_producer({**producer_kwargs(settings), "max_request_size": 80 * 1024 * 1024}),
        expected_identity=scorer.backbone.identity, expected_laa=scorer.config.laa,
        send_timeout_s=settings.request_timeout_ms / 1000,
    )
    return Tuner(settings, scorer, registry, reservoir,
                 lambda: kafka_io.make_consumer(normals_consumer_kwargs(settings)), metrics, health)


def parse_args(argv: Sequence[str]) -> tuple[TunerSettings, argparse.Namespace]:
    return parse_service_args("hpad tune", __doc__.split("\n\n")[0], TunerSettings, argv, [
        ("--max-runs", int, "stop after this many runs ended (tests, demos)"),
        ("--timeout", float, "stop after this many seconds")])


def tune(settings: TunerSettings, ns: argparse.Namespace, telemetry: Telemetry | None) -> int:
    """The tuner until it stops; 0 (fatal errors are `run_main`'s)."""
    assert telemetry is not None
    tuner = build_tuner(settings, telemetry.metrics, telemetry.health)
    if tuner.scorer.backbone.random_weights:
        log.warning("RANDOM WEIGHTS: model %s is not pretrained; tuned prompts carry no meaning",
                    tuner.scorer.backbone.model_name)
    runs = tuner.run(max_runs=ns.max_runs, timeout=ns.timeout)
    log.info("stopped (%s) after %d runs", tuner.stop_reason, runs)
    if tuner.run_in_progress():
        # an abandoned run is still inside torch on its daemon thread; a normal interpreter exit would tear down
        # C++ state under it (std::terminate, SIGABRT). Nothing is left to save: its state and artifact were never
        # written, so leave at once.
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(argv, parse_args, tune, packages=("hpad", "consumers", "tuner"),
                    metrics=lambda settings: TunerMetrics(), fatal=(RegistryError, KafkaError, HpadError), logger=log)

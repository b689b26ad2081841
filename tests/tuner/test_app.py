"""The tuner daemon: schedule, normals intake, the closed loop scorer -> normals -> tuner -> registry -> scorer,
the validation gate, a kill mid-run, and an unwritable reservoir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from kafka import KafkaConsumer

from consumers.app import build_provider
from consumers.camera import frame_headers
from consumers.metrics import WorkerMetrics
from consumers.models import model_info
from consumers.settings import prompts_consumer_kwargs
from consumers.worker import Worker
from hpad.errors import ConfigError
from hpad.metrics import PoolMetrics
from hpad.scorer import Scorer, ScorerConfig
from tests.consumers.kafka_helpers import (
    WorkerThread,
    encode,
    events_by_frame,
    good_frame,
    image,
    wait_for,
)
from tuner import app as tuner_app
from tuner.app import CategoryState, Tuner, due_reason, load_state, save_state
from tuner.registry import PromptRegistry, parse_record, read_topic
from tuner.reservoir import Reservoir
from tuner.settings import TunerSettings

SCHEDULE = {"interval_s": 3600.0, "new_samples": 10, "min_gap_s": 60.0, "retry_s": 300.0, "min_normals": 6}


def test_due_reason_follows_the_schedule():
    fresh = CategoryState()
    assert due_reason(fresh, 1000.0, 5, **SCHEDULE) is None  # too few normals
    assert due_reason(fresh, 1000.0, 6, **SCHEDULE) == "first"
    ran = CategoryState(last_run_end=1000.0, since=3)
    assert due_reason(ran, 1030.0, 50, **SCHEDULE) is None  # min gap
    assert due_reason(ran, 2000.0, 50, **SCHEDULE) is None  # not enough new samples, interval not over
    assert due_reason(CategoryState(last_run_end=1000.0, since=10), 2000.0, 50, **SCHEDULE) == "new_samples"
    assert due_reason(ran, 4601.0, 50, **SCHEDULE) == "interval"
    failed = CategoryState(last_run_end=0.0, since=20, last_failure=1000.0)
    assert due_reason(failed, 1100.0, 50, **SCHEDULE) is None  # retry back-off
    assert due_reason(failed, 1301.0, 50, **SCHEDULE) == "new_samples"
    assert due_reason(ran, 9999.0, 50, **{**SCHEDULE, "interval_s": 0.0}) is None  # interval off


def test_state_round_trips_and_a_corrupt_file_starts_fresh(tmp_path):
    path = tmp_path / "tuner-state.json"
    states = {"widget": CategoryState(last_run_end=5.0, since=2, runs=1, last_outcome="published")}
    save_state(path, states)
    assert load_state(path) == states
    assert not list(tmp_path.glob(".*.tmp"))
    path.write_text("{not json")
    assert load_state(path) == {}


def tuner_settings(tmp_path, **overrides) -> TunerSettings:
    values = {
        "model": "hpad-tiny", "random_init": True, "device": "cpu", "categories": ["widget"],
        "reservoir_dir": tmp_path / "reservoir", "reservoir_recent": 16, "reservoir_verified": 4,
        "shots": 2, "min_normals": 6, "gate_normals": 3, "gate_anomalies": 6, "epochs": 2, "steps_per_epoch": 2,
        "batch_size": 8, "n_ctx": 4, "new_samples": 6, "interval_s": 0, "min_gap_s": 0, "retry_s": 1,
        "margin": 0.9, "metrics_port": -1, "session_timeout_ms": 2000, "heartbeat_interval_ms": 500,
    }
    values.update(overrides)
    return TunerSettings(**values)


def offline_tuner(tmp_path, tiny_backbone, **overrides) -> Tuner:
    s = tuner_settings(tmp_path, **overrides)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=8))
    reservoir = Reservoir(s.reservoir_dir, s.reservoir_recent, s.reservoir_verified)
    return Tuner(s, scorer, registry=None, reservoir=reservoir, consumer_factory=lambda: None)


def record(value, headers, key=b"cam-1", offset=0):
    return SimpleNamespace(value=value, headers=headers, key=key, topic="normals", partition=0, offset=offset)


def test_ingest_stores_good_frames_and_drops_bad_ones_with_a_reason(tmp_path, tiny_backbone):
    tuner = offline_tuner(tmp_path, tiny_backbone)
    rng = np.random.default_rng(0)
    png = encode(image(rng, (48, 64)))
    assert tuner.ingest(record(png, frame_headers("f1", "cam-1", "widget", "image/png"))) == "stored"
    verified = [*frame_headers("f2", "cam-1", "widget", "image/png"), ("verified", b"true")]
    assert tuner.ingest(record(png, verified)) == "stored"
    assert tuner.ingest(record(png, frame_headers("f3", "cam-1", "gadget", "image/png"))) == "unknown_category"
    assert tuner.ingest(record(b"\x89PNG garbage", frame_headers("f4", "cam-1", "widget", "image/png"))) == \
        "undecodable"
    assert tuner.ingest(record(png, [("frame_id", b"f5")])) == "bad_header"
    assert tuner.ingest(record(b"x" * (tuner.limits.max_payload_bytes + 1),
                               frame_headers("f6", "cam-1", "widget", "image/png"))) == "too_large"
    assert tuner.reservoir.size("widget", "recent") == 1 and tuner.reservoir.size("widget", "verified") == 1
    stored = tuner.reservoir.load(tuner.reservoir.samples("widget", "recent"))[0]
    assert stored.shape == (48, 64, 3)
    assert tuner.states["widget"].since == 2
    m = tuner.metrics
    assert [m.dropped.labels(reason=r)._value.get() for r in ("unknown_category", "undecodable", "bad_header",
                                                              "too_large")] == [1, 1, 1, 1]


def test_unwritable_reservoir_fails_at_start_and_write_errors_mid_run_are_counted(tmp_path, tiny_backbone):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(ConfigError, match="HPAD_RESERVOIR_DIR"):
        Reservoir(blocked / "reservoir", 4, 4)
    tuner = offline_tuner(tmp_path, tiny_backbone)
    rng = np.random.default_rng(1)
    png = encode(image(rng, (48, 64)))
    assert tuner.ingest(record(png, frame_headers("ok", "cam-1", "widget", "image/png"))) == "stored"
    pool = tuner.reservoir.root / "widget" / "recent"
    for sample in pool.iterdir():
        sample.unlink()
    pool.rmdir()
    pool.write_text("the volume went bad")  # writes into it now fail, even as root
    assert tuner.ingest(record(png, frame_headers("lost", "cam-1", "widget", "image/png"))) == "write_error"
    assert tuner.metrics.write_errors._value.get() == 1
    verified = [*frame_headers("v", "cam-1", "widget", "image/png"), ("verified", b"true")]
    assert tuner.ingest(record(png, verified)) == "stored"  # the tuner keeps working with what it can write


@pytest.mark.kafka
def test_closed_loop_scorer_samples_normals_tuner_publishes_scorer_swaps(kafka, tiny_backbone, tmp_path):
    """Invariants: normals sampled by a live scorer reach the reservoir; the tuner publishes one complete
    version; the running scorer swaps to it between batches and no frame is lost."""
    topics = kafka.new_topics(partitions=1, prefix="loop")
    normals_topic, prompts_topic = f"{topics.frames}.normals", f"{topics.frames}.prompts"
    kafka.create_topic(normals_topic, 1)
    kafka.create_topic(prompts_topic, 1)
    ws = kafka.settings(topics, categories=["widget"], prompts_topic=prompts_topic,
                        normals_topic=normals_topic, normals_margin=0.0, normals_per_minute=600)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=4))
    metrics = WorkerMetrics()
    provider = build_provider(ws, scorer, metrics)
    worker = Worker(ws, scorer, provider, model_info(scorer, ws.precision), metrics)
    # the zero-shot threshold of a random model is arbitrary: put it above every score so frames count as normal
    zero_shot = provider.snapshot()["widget"]
    provider._snapshot = type(provider.snapshot())({"widget": __import__("dataclasses").replace(zero_shot,
                                                                                                  threshold=2.0)})
    worker_thread = WorkerThread(worker, {"timeout": 180}).start()
    ts = tuner_settings(tmp_path, bootstrap_servers=kafka.bootstrap, normals_topic=normals_topic,
                        prompts_topic=prompts_topic, group_id=f"tuner-{uuid.uuid4().hex[:6]}")
    tuner = tuner_app.build_tuner(ts)
    tuner_thread = threading.Thread(target=tuner.run, kwargs={"max_runs": 1, "timeout": 150,
                                                              "install_signals": False})
    tuner_thread.start()
    rng = np.random.default_rng(2)
    first = kafka.publish(topics.frames, [good_frame(rng, "widget") for _ in range(12)])
    wait_for(lambda: provider.snapshot().version("widget") == 1, timeout=150, what="tuned version swapped in")
    tuner_thread.join(timeout=60)
    assert not tuner_thread.is_alive()
    assert [r.outcome for r in tuner.reports] == ["published"]
    assert tuner.reservoir.size("widget", "recent") >= 6
    assert metrics.normals_published.labels(category="widget")._value.get() >= 6
    later = kafka.publish(topics.frames, [good_frame(rng, "widget") for _ in range(4)])
    wait_for(lambda: worker.pipeline.completed >= 16, timeout=60, what="16 frames done")
    assert worker_thread.stop().exit_code == 0
    events = events_by_frame(kafka.read_all(topics.events, expected=16))
    assert set(events) == {f.frame_id for f in first + later}
    assert {events[f.frame_id][0]["prompt_version"] for f in later} == {1}
    rows = [parse_record(r) for r in read_topic(KafkaConsumer(**prompts_consumer_kwargs(ts)), prompts_topic)]
    assert [(r.version, r.artifact is not None) for r in rows] == [(1, True)]
    manifest = rows[0].artifact.manifest
    assert manifest["tuned_by"] == "hpad tune" and manifest["random_weights"] is True
    assert set(manifest["gate"]["candidate"]) >= {"image_AUROC"}
    state = json.loads((ts.reservoir_dir / "tuner-state.json").read_text())
    assert state["widget"]["runs"] == 1 and state["widget"]["last_outcome"] == "published"
    exposition = tuner.metrics.exposition().decode()
    assert 'hpad_tuner_runs_total{category="widget",outcome="published"} 1.0' in exposition
    assert 'hpad_tuner_published_version{category="widget"} 1.0' in exposition


def fill_reservoir(root, n: int, seed: int = 3) -> None:
    reservoir = Reservoir(root, 16, 4)
    rng = np.random.default_rng(seed)
    for i in range(n):
        reservoir.add("widget", f"seed-{i}", image(rng, (64, 80)))


@pytest.mark.kafka
def test_a_rejected_candidate_is_counted_and_never_published(kafka_broker, tiny_backbone, tmp_path, monkeypatch):
    import tuner.job as job

    real_gate = job.gate
    monkeypatch.setattr(job, "gate", lambda cur, cand, margin: real_gate(cur, PoolMetrics(-1.0, -1.0), 0.0))
    prompts_topic = f"rej-prompts-{uuid.uuid4().hex[:6]}"
    kafka_broker.create_topic(prompts_topic, 1)
    ts = tuner_settings(tmp_path, bootstrap_servers=kafka_broker.bootstrap, prompts_topic=prompts_topic,
                        normals_topic=f"{prompts_topic}.normals", group_id=f"g-{uuid.uuid4().hex[:6]}")
    fill_reservoir(ts.reservoir_dir, 8)
    tuner = tuner_app.build_tuner(ts)
    report = tuner.run_category("widget")
    assert report.outcome == "rejected" and "worse" in report.reason
    assert report.candidate and report.current  # both scores recorded
    tuner._record(report)
    assert read_topic(KafkaConsumer(**prompts_consumer_kwargs(ts)), prompts_topic) == []
    assert tuner.metrics.runs.labels(category="widget", outcome="rejected")._value.get() == 1
    assert tuner.metrics.validation.labels(category="widget", which="candidate", metric="image_AUROC")._value.get() \
        == -1.0


def spawn_tuner(broker, ts: TunerSettings, tmp_path, name: str, epochs: int, max_runs: int | None = None):
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap,
        "HPAD_NORMALS_TOPIC": ts.normals_topic, "HPAD_PROMPTS_TOPIC": ts.prompts_topic, "HPAD_GROUP_ID": ts.group_id,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_CATEGORIES": "widget", "HPAD_RESERVOIR_DIR": str(ts.reservoir_dir), "HPAD_RESERVOIR_RECENT": "16",
        "HPAD_RESERVOIR_VERIFIED": "4", "HPAD_SHOTS": "2", "HPAD_MIN_NORMALS": "6", "HPAD_GATE_NORMALS": "3",
        "HPAD_GATE_ANOMALIES": "6", "HPAD_EPOCHS": str(epochs), "HPAD_STEPS_PER_EPOCH": "4", "HPAD_BATCH_SIZE": "8",
        "HPAD_N_CTX": "4", "HPAD_MARGIN": "0.9", "HPAD_METRICS_PORT": "-1", "HPAD_INTERVAL_S": "0",
        "HPAD_NEW_SAMPLES": "6", "HPAD_MIN_GAP_S": "0", "HPAD_SESSION_TIMEOUT_MS": "2000",
        "HPAD_HEARTBEAT_INTERVAL_MS": "500", "HPAD_PATIENCE": str(epochs),
    }
    args = [sys.executable, "-m", "hpad.cli", "tune"] + (["--max-runs", str(max_runs)] if max_runs else [])
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed by the caller
    return subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT), log


def start_long_run(broker, tmp_path, prefix: str, name: str):
    """Fresh topics, a filled reservoir, and `hpad tune` as a process inside a 500-epoch run of widget."""
    prompts_topic = f"{prefix}-prompts-{uuid.uuid4().hex[:6]}"
    broker.create_topic(prompts_topic, 1)
    broker.create_topic(f"{prompts_topic}.normals", 1)
    ts = tuner_settings(tmp_path, bootstrap_servers=broker.bootstrap, prompts_topic=prompts_topic,
                        normals_topic=f"{prompts_topic}.normals", group_id=f"g-{uuid.uuid4().hex[:6]}")
    fill_reservoir(ts.reservoir_dir, 8)
    process, log = spawn_tuner(broker, ts, tmp_path, name, epochs=500)
    log_path = tmp_path / f"{name}.log"
    try:
        wait_for(lambda: b"tuning run for widget starts" in log_path.read_bytes(), timeout=90, what="run started")
    except BaseException:
        process.kill()
        log.close()
        raise
    return ts, process, log, log_path


@pytest.mark.kafka
@pytest.mark.slow
def test_tuner_killed_mid_run_publishes_nothing_and_resumes(broker, tmp_path):
    """Invariant: a run interrupted by SIGKILL leaves no record on the prompts topic (a version is one
    acknowledged record or nothing) and no schedule update; the restarted tuner runs it again and publishes."""
    ts, process, log, _ = start_long_run(broker, tmp_path, "kill", "first")
    try:
        time.sleep(2.0)  # well inside the 500-epoch run
        assert process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert read_topic(KafkaConsumer(**prompts_consumer_kwargs(ts)), ts.prompts_topic) == []
    assert not (ts.reservoir_dir / "tuner-state.json").exists()
    process, log = spawn_tuner(broker, ts, tmp_path, "second", epochs=2, max_runs=1)
    try:
        assert process.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    rows = [parse_record(r) for r in read_topic(KafkaConsumer(**prompts_consumer_kwargs(ts)), ts.prompts_topic)]
    assert [(r.version, r.artifact is not None) for r in rows] == [(1, True)]
    state = json.loads((ts.reservoir_dir / "tuner-state.json").read_text())
    assert state["widget"]["runs"] == 1 and state["widget"]["last_outcome"] == "published"


def test_labelled_anomalies_are_read_with_their_masks(tmp_path):
    folder = tmp_path / "labelled" / "widget"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    picture = image(rng, (40, 50))
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 5:15] = 255
    cv2.imwrite(str(folder / "crack.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "crack_mask.png"), mask)
    cv2.imwrite(str(folder / "orphan.png"), picture)  # no mask: skipped
    images, masks = tuner_app.load_labelled(tmp_path / "labelled", "widget")
    assert len(images) == 1 and images[0].shape == (40, 50, 3)
    assert masks[0].sum() == 100
    assert tuner_app.load_labelled(tmp_path / "labelled", "gadget") == ([], [])


def test_tuner_settings_validate(tmp_path):
    with pytest.raises(ConfigError, match="HPAD_MIN_NORMALS"):
        from consumers.settings import load_settings

        load_settings(TunerSettings, {"shots": 8, "min_normals": 6, "random_init": True})
    assert PromptRegistry  # imported for the registry tests


@pytest.mark.kafka
@pytest.mark.slow
def test_sigterm_during_a_run_exits_promptly_and_publishes_nothing(kafka_broker, tmp_path):
    """Invariant: SIGTERM mid-run stops the tuner within seconds (the run thread does not keep it alive) with
    exit code 0, and the abandoned run publishes nothing."""
    ts, process, log, log_path = start_long_run(kafka_broker, tmp_path, "term", "term")
    try:
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert b"abandoned" in log_path.read_bytes()
    assert read_topic(KafkaConsumer(**prompts_consumer_kwargs(ts)), ts.prompts_topic) == []

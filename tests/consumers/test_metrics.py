"""Metrics: names and conventions, the exported name list, and the /metrics /healthz /readyz endpoints."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from consumers.metrics import Health, MetricsServer, WorkerMetrics, metric_names, sample_names

EXPECTED = {
    "hpad_frames_total", "hpad_dead_letters_total", "hpad_batch_size", "hpad_stage_duration_seconds",
    "hpad_end_to_end_latency_seconds", "hpad_anomalies_total", "hpad_prompt_version_info", "hpad_consumer_lag",
    "hpad_model_info", "hpad_retries_total", "hpad_commits_total", "hpad_assigned_partitions",
    "hpad_inflight_frames", "hpad_ready", "hpad_main_loop_heartbeat_timestamp_seconds",
    "hpad_prompt_swaps_total", "hpad_prompt_rejected_total", "hpad_prompt_last_swap_timestamp_seconds",
    "hpad_normals_published_total",
}
FORBIDDEN_LABELS = {"frame_id", "camera_id", "offset"}


def test_metric_names_are_exported_and_follow_conventions():
    names = metric_names()
    assert set(names) == EXPECTED
    for name, kind, labels, text in WorkerMetrics().families():
        assert name.startswith("hpad_") and text
        assert (kind == "counter") == name.endswith("_total")
        if "duration" in name or "latency" in name:
            assert name.endswith("_seconds") and kind == "histogram"
        assert not FORBIDDEN_LABELS & set(labels)
    assert "hpad_stage_duration_seconds_bucket" in sample_names() and "hpad_frames_total" in sample_names()


def test_exposition_parses_and_shows_random_weights_and_prompts():
    metrics = WorkerMetrics()
    metrics.set_model("hpad-tiny", "random-init", True, "cpu", "fp32")
    metrics.set_prompt("widget", 0, "zero-shot")
    metrics.set_prompt("widget", 2, "learned")  # a swap replaces the old series
    metrics.set_lag({("frames", 0): 5, ("frames", 1): 0})
    metrics.set_lag({("frames", 1): 3})
    metrics.stage.labels(stage="infer").observe(0.2)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    model = families["hpad_model_info"].samples[0]
    assert model.labels["random_weights"] == "true" and model.labels["weights"] == "random-init"
    prompts = [s.labels for s in families["hpad_prompt_version_info"].samples]
    assert prompts == [{"category": "widget", "version": "2", "source": "learned"}]
    lags = {s.labels["partition"]: s.value for s in families["hpad_consumer_lag"].samples}
    assert lags == {"1": 3.0}
    stages = {s.labels["stage"] for s in families["hpad_stage_duration_seconds"].samples}
    assert stages == {"decode", "queue", "infer", "encode", "produce", "commit"}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints():
    metrics, health = WorkerMetrics(), Health(liveness_timeout_s=0.3)
    server = MetricsServer(metrics, health, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = get(base + "/metrics")
        assert status == 200 and "hpad_frames_total" in body
        assert get(base + "/readyz")[0] == 503
        health.model_loaded, health.assigned = True, 2
        assert get(base + "/readyz")[0] == 200
        health.beat()
        assert get(base + "/healthz")[0] == 200
        time.sleep(0.4)  # no heartbeat for longer than the liveness timeout
        status, body = get(base + "/healthz")
        assert status == 503 and "stuck" in body
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()

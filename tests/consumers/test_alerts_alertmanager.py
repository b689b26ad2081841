"""`hpad alerts` and the monitoring rules against a real Alertmanager (Debian prometheus-alertmanager).

1. `hpad alerts` as a process on the tansu broker, events in the real schema: an alert fires at the k-th
   anomaly of n, one camera's episode does not touch another's, a SIGKILL + restart (state rebuilt from the
   re-read events) sends no duplicate, a prompt hot-swap mid-episode keeps one alert, m normal frames resolve it
   (Alertmanager's own webhook notification says ``resolved``).
2. Monitoring end to end: a real Prometheus scrapes a running worker, loads deploy/prometheus/hpad-rules.yaml
   (a copy with every ``for:`` set to 0s: the shipped file is unchanged), and undecodable frames (dead letters)
   and a corrupt prompt version make HpadDeadLetterRateHigh and HpadPromptVersionsRejected reach the same
   Alertmanager, read back through its API.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from kafka import KafkaProducer

from tests.consumers.alerting_helpers import (
    Alertmanager,
    AlertsProcess,
    Prometheus,
    WebhookReceiver,
    event_bytes,
    now,
    sample,
    wait_until,
)
from tests.consumers.kafka_helpers import Frame, KafkaTools, good_frame

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "hpad-rules.yaml"


@pytest.fixture(scope="module")
def am_notifications():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory, am_notifications):
    with Alertmanager(tmp_path_factory.mktemp("alertmanager"), notify_url=f"{am_notifications.url}/am") as am:
        yield am


@pytest.fixture
def tansu(kafka_broker) -> KafkaTools:
    return KafkaTools(kafka_broker)


def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes, int]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    try:
        for key, value, partition in records:
            producer.send(topic, key=key.encode(), value=value, partition=partition,
                          headers=[("content-type", b"application/json")])
        producer.flush()
    finally:
        producer.close()


def test_alertmanager_fires_after_k_of_n_resolves_and_a_restart_sends_no_duplicate(
        tansu, alertmanager, am_notifications, tmp_path):
    tag = uuid.uuid4().hex[:8]
    topic, dlq, group = f"al-{tag}.events", f"al-{tag}.dlq", f"al-{tag}.group"
    tansu.create_topic(topic, 2)
    tansu.create_topic(dlq, 1)
    cam_a, cam_b = f"cam-a-{tag}", f"cam-b-{tag}"
    env = {"HPAD_BOOTSTRAP_SERVERS": tansu.bootstrap, "HPAD_EVENTS_TOPIC": topic, "HPAD_GROUP_ID": group,
           "HPAD_ALERTS_DLQ_TOPIC": dlq, "HPAD_ALERTS_ALERTMANAGER_URL": alertmanager.url,
           "HPAD_ALERTS_WINDOW": "5", "HPAD_ALERTS_MIN_ANOMALOUS": "3", "HPAD_ALERTS_RESOLVE_NORMALS": "3",
           "HPAD_ALERTS_COOLDOWN_S": "0", "HPAD_ALERTS_RESEND_S": "2", "HPAD_ALERTS_TTL_S": "120",
           "HPAD_ALERTS_CONSOLE_URL": "http://console.test:8090"}
    seq = {cam_a: 0, cam_b: 0}
    start = now()

    def send(camera: str, pattern: str, partition: int, version: int = 0) -> None:
        records = []
        for char in pattern:
            at = start + timedelta(seconds=seq[camera])  # event time: one frame a second from the start
            records.append((camera, event_bytes(camera, seq[camera], char == "A", at, prompt_version=version), partition))
            seq[camera] += 1
        produce(tansu.bootstrap, topic, records)

    fingerprints: dict[str, set[str]] = {cam_a: set(), cam_b: set()}

    def active(camera: str) -> list[dict]:
        found = alertmanager.alerts(camera=camera)
        fingerprints[camera].update(a["fingerprint"] for a in found)
        return found

    first = AlertsProcess(tmp_path, "alerts-1", env)
    second = None
    try:
        send(cam_a, "A.A", 0)  # 2 anomalous of 5: not yet
        send(cam_b, "AAA", 1)  # 3 of 5: fires
        first.wait_live(6)
        wait_until(lambda: active(cam_b), 30, "cam-b alert in Alertmanager")
        assert active(cam_a) == [], "fired before k anomalies among the last n"
        send(cam_a, "A", 0)  # the 3rd anomaly among the last 5 frames of cam-a
        fired = wait_until(lambda: active(cam_a), 30, "cam-a alert in Alertmanager")
        assert len(fired) == 1
        alert = fired[0]
        assert alert["labels"] == {"alertname": "HpadAnomaly", "camera": cam_a, "category": "widget",
                                   "severity": "warning", "prompt_version": "0"}
        assert alert["annotations"]["frame_id"] == f"{cam_a}-00003"
        assert alert["annotations"]["score"] == "0.900000"
        assert alert["annotations"]["console"] == f"http://console.test:8090/frame/{cam_a}-00003"
        assert alert["status"]["state"] == "active"
        starts_at = alert["startsAt"]
        committed = wait_until(lambda: all(v for v in tansu.committed_offsets(group, topic).values()) and
                               tansu.committed_offsets(group, topic), 30, "offsets committed")
        assert committed == {0: 4, 1: 3}

        assert first.kill() != 0  # crash: SIGKILL
        first.stop()
        send(cam_a, "AA", 0, version=1)  # the episode goes on; a prompt hot-swap happened meanwhile
        second = AlertsProcess(tmp_path, "alerts-2", env)
        second.wait_live(2)
        wait_until(lambda: sample(second.metrics_port, "hpad_alerts_alertmanager_resends_total") >= 2, 30,
                   "open episodes re-sent after the restart")
        assert sample(second.metrics_port, "hpad_alerts_events_total", result="replayed") == 7  # 4 + 3 re-read
        after = active(cam_a)
        assert len(after) == 1 and after[0]["startsAt"] == starts_at
        assert after[0]["labels"]["prompt_version"] == "0"  # the episode keeps its identity across the swap
        assert after[0]["annotations"]["last_prompt_version"] == "1"
        assert len(active(cam_b)) == 1

        send(cam_a, "..", 0)
        second.wait_live(4)
        assert len(active(cam_a)) == 1, "resolved before m normal frames in a row"
        send(cam_a, ".", 0)  # the 3rd normal in a row
        wait_until(lambda: active(cam_a) == [], 30, "cam-a alert resolved in Alertmanager")
        assert len(active(cam_b)) == 1  # the other camera's episode is still open

        def notified(status: str) -> list[dict]:
            out = []
            for request in am_notifications.on("/am"):
                message = json.loads(request.body)
                out += [a for a in message["alerts"] if a["labels"].get("camera") == cam_a and a["status"] == status]
            return out

        resolved = wait_until(lambda: notified("resolved"), 30, "Alertmanager's resolved notification")
        assert resolved[0]["startsAt"] == starts_at
        firing_alerts = {json.dumps(a["labels"], sort_keys=True) for a in notified("firing")}
        duplicates = len(fingerprints[cam_a]) - 1
        assert duplicates == 0 and len(firing_alerts) == 1, (fingerprints, firing_alerts)
        assert sample(second.metrics_port, "hpad_alerts_notifications_total", sink="alertmanager",
                      status="resolved") == 1
        print(f"\nALERTMANAGER: fired {cam_a} at frame 3 (3 anomalous of the last 5), "
              f"startsAt {starts_at}; restart (SIGKILL) -> replayed 7 events, alerts for {cam_a}: "
              f"{len(fingerprints[cam_a])} (duplicates {duplicates}); resolved after 3 normal frames "
              f"(Alertmanager notified 'resolved'); {cam_b} still firing")
        assert second.stop() == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _rules_without_for(target: Path) -> Path:
    """A copy of the shipped rules with every ``for:`` at 0s (the shipped file stays unchanged)."""
    document = yaml.safe_load(RULES.read_text())
    changed = 0
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
                changed += 1
    assert changed >= 5
    target.write_text(yaml.safe_dump(document))
    return target


def test_prometheus_rules_fire_into_alertmanager_from_a_running_worker(
        tansu, alertmanager, tiny_backbone, tmp_path):
    from consumers.app import build_provider
    from consumers.metrics import Health, WorkerMetrics, start_metrics_server
    from consumers.models import model_info
    from consumers.worker import Worker
    from hpad.scorer import Scorer, ScorerConfig
    from tests.consumers.kafka_helpers import WorkerThread

    topics = tansu.new_topics(partitions=1)
    prompts = f"{topics.frames}.prompts"
    tansu.create_topic(prompts, 1)
    settings = tansu.settings(topics, categories=["widget"], prompts_topic=prompts)
    scorer = Scorer(tiny_backbone, config=ScorerConfig(max_batch=settings.max_batch_size))
    metrics, health = WorkerMetrics(), Health(60)
    server = start_metrics_server(metrics, health, "127.0.0.1", 0)
    worker = Worker(settings, scorer, build_provider(settings, scorer, metrics), model_info(scorer, "fp32"),
                    metrics, health)
    thread = WorkerThread(worker).start()
    rules = _rules_without_for(tmp_path / "hpad-rules.yaml")
    target = f"127.0.0.1:{server.port}"
    try:
        with Prometheus(tmp_path / "prometheus", {"hpad-scorer": [target]}, [rules],
                        alertmanager.url.removeprefix("http://")) as prometheus:
            wait_until(lambda: prometheus.query(f'up{{instance="{target}"}} == 1'), 60, "worker scraped")
            wait_until(lambda: prometheus.query(f'hpad_dead_letters_total{{instance="{target}"}}'), 30,
                       "dead-letter series scraped at 0")
            rng = np.random.default_rng(3)
            good = good_frame(rng)
            broken = [Frame(b"\x89PNG\r\n\x1a\n not really a png " + bytes([i]), good.headers, good.key)
                      for i in range(6)]
            for frame in broken:  # every frame needs its own frame_id
                frame.headers = [(k, (v + f"-{uuid.uuid4().hex[:6]}".encode()) if k == "frame_id" else v)
                                 for k, v in frame.headers]
            tansu.publish(topics.frames, broken)
            producer = KafkaProducer(bootstrap_servers=tansu.bootstrap)
            producer.send(prompts, key=b"widget", value=b"not a safetensors artifact")
            producer.flush()
            producer.close()
            wait_until(lambda: worker.metrics.dead_letters.labels(reason="undecodable")._value.get() >= 6, 60,
                       "the worker dead-lettered the frames")
            dead = wait_until(lambda: alertmanager.alerts(alertname="HpadDeadLetterRateHigh", reason="undecodable"), 60,
                              "HpadDeadLetterRateHigh in Alertmanager")
            assert dead[0]["labels"]["reason"] == "undecodable" and dead[0]["labels"]["severity"] == "warning"
            assert re.search("more than 5% of frames are dead-lettered with reason undecodable",
                             dead[0]["annotations"]["summary"])
            rejected = wait_until(lambda: alertmanager.alerts(alertname="HpadPromptVersionsRejected"), 60,
                                  "HpadPromptVersionsRejected in Alertmanager")
            assert rejected[0]["labels"]["reason"] == "invalid"
            firing = sorted({a["labels"]["alertname"] for a in prometheus.rule_alerts() if a["state"] == "firing"})
            print(f"\nPROMETHEUS -> ALERTMANAGER: rules firing {firing}; Alertmanager has HpadDeadLetterRateHigh"
                  f" (reason undecodable) and HpadPromptVersionsRejected (reason invalid)")
    finally:
        thread.stop()
        server.stop()

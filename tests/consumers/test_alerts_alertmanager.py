"""`hpad alerts` and the monitoring rules against a real Alertmanager (Debian prometheus-alertmanager).

1. `hpad alerts` as a process on the tansu broker, events in the real schema: an alert fires at the k-th
   anomaly of n, one camera's episode does not touch another's, a SIGKILL + restart (state rebuilt from the
   re-read events) sends no duplicate, a prompt hot-swap mid-episode keeps one alert, m normal frames resolve it
   (Alertmanager's own webhook notification says ``resolved``).
2. Alertmanager down: nothing is committed while its port refuses connections; the alert arrives (and the
   offsets move) once a real Alertmanager listens there. Two replicas: partitions move, state is rebuilt
   (without the re-read the moved window would not fire: checked by hand with HPAD_ALERTS_REPLAY_RECORDS=0).
3. Monitoring end to end: a real Prometheus scrapes a running worker and a running tuner, loads
   deploy/prometheus/hpad-rules.yaml (a copy with every ``for:`` set to 0s: the shipped file is unchanged),
   and undecodable frames (dead letters), a corrupt prompt version and a reservoir write failure make
   HpadDeadLetterRateHigh, HpadPromptVersionsRejected and HpadReservoirWriteErrors reach the same
   Alertmanager, read back through its API.
"""

from __future__ import annotations

import json
import re
import threading
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


def test_nothing_is_committed_while_alertmanager_is_down_and_the_alert_arrives_when_it_is_up(
        tansu, clean_hpad_env, tmp_path):
    """`AlertService` in a thread: Alertmanager's port refuses connections, the service retries (capped
    backoff) and commits nothing; once a real Alertmanager listens there, the alert arrives and the offsets
    move."""
    from consumers import kafka_io
    from consumers.alerts.app import AlertService
    from consumers.alerts.settings import AlertsSettings, alerts_consumer_kwargs
    from consumers.settings import producer_kwargs
    from tests.consumers.alerting_helpers import free_port
    from tests.consumers.kafka_helpers import FAST_GROUP

    tag = uuid.uuid4().hex[:8]
    topic, group, camera = f"down-{tag}.events", f"down-{tag}.group", f"cam-{tag}"
    tansu.create_topic(topic, 1)
    port = free_port()
    settings = AlertsSettings(
        bootstrap_servers=tansu.bootstrap, events_topic=topic, group_id=group, alerts_dlq_topic=f"down-{tag}.dlq",
        auto_offset_reset="earliest", alerts_alertmanager_url=f"http://127.0.0.1:{port}", alerts_window=3,
        alerts_min_anomalous=2, alerts_resolve_normals=2, alerts_cooldown_s=0, alerts_retry_backoff_ms=100,
        alerts_retry_backoff_max_ms=400, metrics_port=-1, **FAST_GROUP)
    service = AlertService(settings, lambda: kafka_io.make_consumer(alerts_consumer_kwargs(settings)),
                           lambda: kafka_io.make_producer(producer_kwargs(settings)))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run(timeout=90, install_signals=False)))
    start = now()
    produce(tansu.bootstrap, topic, [(camera, event_bytes(camera, i, True, start + timedelta(seconds=i)), 0)
                                     for i in range(2)])
    thread.start()
    try:
        wait_until(lambda: service.metrics.sink_errors.labels(sink="alertmanager")._value.get() >= 3, 60,
                   "Alertmanager retries")
        assert tansu.committed_offsets(group, topic) == {0: None}
        with Alertmanager(tmp_path / "late-alertmanager", port=port) as late:
            wait_until(lambda: tansu.committed_offsets(group, topic) == {0: 2}, 30, "commit after delivery")
            found = late.alerts(camera=camera)
            assert len(found) == 1 and found[0]["annotations"]["frame_id"] == f"{camera}-00001"
            assert service.metrics.notifications.labels(sink="alertmanager", status="firing")._value.get() == 1
    finally:
        service.request_stop()
        thread.join(30)
    assert result == [0]


def test_a_second_replica_takes_a_partition_and_rebuilds_its_state(tansu, alertmanager, clean_hpad_env, tmp_path):
    """Two `AlertService` replicas (threads) in one group, Alertmanager and a webhook as sinks: after the
    second joins, partitions move (eager rebalance: every partition is revoked and re-assigned, so each owner
    re-reads its tail); a window that was 2 of 3 before the move fires at the next anomaly, an open episode is
    not opened again (one firing key per camera at the webhook, one alert in Alertmanager)."""
    from consumers import kafka_io
    from consumers.alerts.app import AlertService
    from consumers.alerts.settings import AlertsSettings, alerts_consumer_kwargs
    from consumers.settings import producer_kwargs
    from tests.consumers.kafka_helpers import FAST_GROUP

    tag = uuid.uuid4().hex[:8]
    topic, group = f"rb-{tag}.events", f"rb-{tag}.group"
    tansu.create_topic(topic, 2)
    open_cam, partial_cam = f"open-{tag}", f"partial-{tag}"

    with WebhookReceiver() as receiver:
        settings = AlertsSettings(
            bootstrap_servers=tansu.bootstrap, events_topic=topic, group_id=group, alerts_dlq_topic=f"rb-{tag}.dlq",
            auto_offset_reset="earliest", alerts_alertmanager_url=alertmanager.url, alerts_webhook_url=receiver.url,
            alerts_webhook_secret="k", alerts_window=5, alerts_min_anomalous=3, alerts_resolve_normals=3,
            alerts_cooldown_s=0, metrics_port=-1, **FAST_GROUP)

        def replica() -> tuple[AlertService, threading.Thread]:
            service = AlertService(settings, lambda: kafka_io.make_consumer(alerts_consumer_kwargs(settings)),
                                   lambda: kafka_io.make_producer(producer_kwargs(settings)))
            thread = threading.Thread(target=lambda: service.run(timeout=90, install_signals=False))
            thread.start()
            return service, thread

        start = now()
        seq = {open_cam: 0, partial_cam: 0}

        def send(camera: str, pattern: str, partition: int) -> None:
            records = []
            for char in pattern:
                at = start + timedelta(seconds=seq[camera])
                records.append((camera, event_bytes(camera, seq[camera], char == "A", at), partition))
                seq[camera] += 1
            produce(tansu.bootstrap, topic, records)

        def firing_keys(camera: str) -> set[str]:
            return {r.headers["idempotency-key"] for r in receiver.on("/")
                    if json.loads(r.body)["camera_id"] == camera and json.loads(r.body)["status"] == "firing"}

        first, first_thread = replica()
        second = second_thread = None
        try:
            send(open_cam, "AAA", 0)  # an open episode on partition 0
            send(partial_cam, "A.A", 1)  # 2 of 5 on partition 1: not yet
            wait_until(lambda: first.events_done >= 6 and tansu.committed_offsets(group, topic) == {0: 3, 1: 3}, 60,
                       "the first replica processed and committed everything")
            assert firing_keys(open_cam) and not firing_keys(partial_cam)
            second, second_thread = replica()
            wait_until(lambda: first.health.assigned == 1 and second.health.assigned == 1, 60, "partitions split")
            send(partial_cam, "A", 1)  # 3 of the last 5, but only with the frames read before the move
            send(open_cam, "AAA", 0)  # the open episode goes on
            wait_until(lambda: firing_keys(partial_cam), 60, "the moved window fires")
            wait_until(lambda: tansu.committed_offsets(group, topic) == {0: 6, 1: 4}, 60, "offsets after the move")
            assert len(firing_keys(open_cam)) == 1 and len(firing_keys(partial_cam)) == 1
            assert len(alertmanager.alerts(camera=open_cam)) == 1 and len(alertmanager.alerts(camera=partial_cam)) == 1
            replayed = sum(s.metrics.events.labels(result="replayed")._value.get() for s in (first, second))
            assert replayed >= 3  # the moved partition's tail at least
            print(f"\nREBALANCE: 2 replicas, state rebuilt from {int(replayed)} re-read events; the moved 2-of-5 window "
                  f"fired at the next anomaly; firing keys per camera: 1 and 1 (duplicates 0)")
        finally:
            for service in (first, second):
                if service is not None:
                    service.request_stop()
            for thread in (first_thread, second_thread):
                if thread is not None:
                    thread.join(30)


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


def test_prometheus_rules_fire_into_alertmanager_from_a_running_worker_and_tuner(
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
    # the tuner, with a reservoir whose `recent` pool cannot be created (a file is in the way: the tests run
    # as root, so permissions would not stop a write)
    from tuner.app import build_tuner
    from tuner.metrics import TunerMetrics
    from tuner.settings import TunerSettings

    reservoir = tmp_path / "reservoir"
    (reservoir / "widget").mkdir(parents=True)
    (reservoir / "widget" / "recent").write_text("not a folder")
    normals = f"{topics.frames}.normals"
    tansu.create_topic(normals, 1)
    tuner_settings = TunerSettings(bootstrap_servers=tansu.bootstrap, model="hpad-tiny", random_init=True,
                                   device="cpu", categories=["widget"], normals_topic=normals, prompts_topic=prompts,
                                   group_id=f"{topics.group}-tuner", reservoir_dir=reservoir, metrics_port=-1,
                                   session_timeout_ms=2000, heartbeat_interval_ms=500)
    tuner_metrics, tuner_health = TunerMetrics(), Health(60)
    tuner_server = start_metrics_server(tuner_metrics, tuner_health, "127.0.0.1", 0)
    tuner = build_tuner(tuner_settings, tuner_metrics, tuner_health)
    tuner_thread = threading.Thread(target=lambda: tuner.run(timeout=120, install_signals=False), daemon=True)
    tuner_thread.start()
    rules = _rules_without_for(tmp_path / "hpad-rules.yaml")
    target, tuner_target = f"127.0.0.1:{server.port}", f"127.0.0.1:{tuner_server.port}"
    try:
        with Prometheus(tmp_path / "prometheus", {"hpad-scorer": [target], "hpad-tuner": [tuner_target]}, [rules],
                        alertmanager.url.removeprefix("http://")) as prometheus:
            wait_until(lambda: prometheus.query(f'up{{instance="{target}"}} == 1'), 60, "worker scraped")
            wait_until(lambda: prometheus.query(f'hpad_tuner_reservoir_write_errors_total{{instance="{tuner_target}"}}'),
                       60, "tuner scraped")
            tansu.publish(normals, [good_frame(np.random.default_rng(4))])
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
            write_errors = wait_until(lambda: alertmanager.alerts(alertname="HpadReservoirWriteErrors"), 60,
                                      "HpadReservoirWriteErrors in Alertmanager")
            assert write_errors[0]["labels"]["instance"] == tuner_target
            assert tuner_metrics.write_errors._value.get() >= 1
            firing = sorted({a["labels"]["alertname"] for a in prometheus.rule_alerts() if a["state"] == "firing"})
            print(f"\nPROMETHEUS -> ALERTMANAGER: rules firing {firing}; Alertmanager has HpadDeadLetterRateHigh"
                  f" (reason undecodable), HpadPromptVersionsRejected (reason invalid) from the worker and "
                  f"HpadReservoirWriteErrors from the tuner")
    finally:
        tuner.request_stop()
        tuner_thread.join(30)
        tuner_server.stop()
        thread.stop()
        server.stop()
